//! One shard: an OS thread with a single-threaded tokio runtime that owns one `relay-proto`
//! core, one `SO_REUSEPORT` socket per listen address, and the relay sockets of its allocations.
//!
//! Every task of a shard runs on its thread and shares the shard through `Rc<RefCell<_>>`: a
//! borrow, never a lock, and never held across an `.await`. Each task reads a bounded batch,
//! feeds the core, then flushes the core's outputs with non-blocking sends.

use std::cell::RefCell;
use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use relay_proto::{BindError, Dest, FiveTuple, Output, RelayId, Server, Transport};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::metrics::{Publisher, RelayMetrics};
use crate::ports::PortPool;
use crate::{DriverDrop, Phase, IO_LOOP_BOUND, RECV_BUFFER, TICK};

struct Relay {
    id: RelayId,
    port: u16,
    socket: Rc<UdpSocket>,
    task: JoinHandle<()>,
}

struct Listener {
    local: SocketAddr,
    socket: Rc<UdpSocket>,
}

pub(crate) struct Shard {
    core: Server,
    listeners: Vec<Listener>,
    /// Indexed by `RelayId::index()`, which the core keeps dense.
    relays: Vec<Option<Relay>>,
    ports: PortPool,
    recv_buf: Box<[u8]>,
    driver_drops: [u64; DriverDrop::COUNT],
    publisher: Publisher,
    metrics: RelayMetrics,
}

type ShardRef = Rc<RefCell<Shard>>;

pub(crate) struct ShardSetup {
    pub(crate) core: Server,
    pub(crate) listeners: Vec<StdUdpSocket>,
    pub(crate) ports: PortPool,
    pub(crate) metrics: RelayMetrics,
}

/// Runs a shard to completion on the current thread.
pub(crate) fn run(
    index: usize,
    setup: ShardSetup,
    phase: watch::Receiver<Phase>,
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut listeners = Vec::new();
        for s in setup.listeners {
            let local = s.local_addr()?;
            listeners.push(Listener {
                local,
                socket: Rc::new(UdpSocket::from_std(s)?),
            });
        }
        let shard = Rc::new(RefCell::new(Shard {
            core: setup.core,
            listeners,
            relays: Vec::new(),
            ports: setup.ports,
            recv_buf: vec![0u8; RECV_BUFFER].into_boxed_slice(),
            driver_drops: [0; DriverDrop::COUNT],
            publisher: Publisher::default(),
            metrics: setup.metrics,
        }));
        let count = shard.borrow().listeners.len();
        let mut tasks = Vec::new();
        for i in 0..count {
            tasks.push(tokio::task::spawn_local(listener_task(
                Rc::clone(&shard),
                i,
            )));
        }
        debug!(shard = index, "shard running");
        timer_task(Rc::clone(&shard), phase).await;
        for t in tasks {
            t.abort();
        }
        let mut sh = shard.borrow_mut();
        for r in sh.relays.iter_mut().filter_map(Option::take) {
            r.task.abort();
        }
        sh.publish();
        debug!(shard = index, "shard stopped");
        Ok(())
    })
}

async fn listener_task(shard: ShardRef, index: usize) {
    let (socket, local) = {
        let sh = shard.borrow();
        (
            Rc::clone(&sh.listeners[index].socket),
            sh.listeners[index].local,
        )
    };
    loop {
        if let Err(e) = socket.readable().await {
            warn!(error = %e, "listener socket failed");
            return;
        }
        let more = {
            let mut sh = shard.borrow_mut();
            let sh = &mut *sh;
            let now = Instant::now();
            let mut more = false;
            for i in 0..IO_LOOP_BOUND {
                match socket.try_recv_from(&mut sh.recv_buf) {
                    Ok((n, from)) => {
                        let five = FiveTuple {
                            client: from,
                            server: local,
                            transport: Transport::Udp,
                        };
                        sh.core.handle_client(now, five, &sh.recv_buf[..n]);
                        more = i + 1 == IO_LOOP_BOUND;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        sh.driver_drops[DriverDrop::RecvError.index()] += 1;
                        break;
                    }
                }
            }
            sh.flush(&shard, now);
            more
        };
        if more {
            // Let relay sockets and the timer have a turn before the next batch.
            tokio::task::yield_now().await;
        }
    }
}

async fn relay_task(shard: ShardRef, id: RelayId, socket: Rc<UdpSocket>) {
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let more = {
            let mut sh = shard.borrow_mut();
            let sh = &mut *sh;
            let now = Instant::now();
            let mut more = false;
            for i in 0..IO_LOOP_BOUND {
                match socket.try_recv_from(&mut sh.recv_buf) {
                    Ok((n, from)) => {
                        sh.core.handle_peer(now, id, from, &sh.recv_buf[..n]);
                        more = i + 1 == IO_LOOP_BOUND;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        sh.driver_drops[DriverDrop::RecvError.index()] += 1;
                        break;
                    }
                }
            }
            sh.flush(&shard, now);
            more
        };
        if more {
            tokio::task::yield_now().await;
        }
    }
}

async fn timer_task(shard: ShardRef, mut phase: watch::Receiver<Phase>) {
    let mut draining = false;
    loop {
        let deadline = {
            let sh = shard.borrow();
            let tick = tokio::time::Instant::now() + TICK;
            match sh.core.poll_timeout() {
                Some(t) => tick.min(tokio::time::Instant::from_std(t)),
                None => tick,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            changed = phase.changed() => {
                if changed.is_err() {
                    // The server handle is gone: stop as if told to.
                    break;
                }
            }
        }
        let now = Instant::now();
        let current = *phase.borrow();
        let mut sh = shard.borrow_mut();
        sh.core.handle_wall_clock(now, SystemTime::now());
        sh.core.handle_timeout(now);
        match current {
            Phase::Running => {}
            Phase::Draining if !draining => {
                draining = true;
                sh.core.start_draining();
            }
            Phase::Draining => {}
            Phase::Stop => {
                sh.core.close_all();
                sh.flush(&shard, now);
                break;
            }
        }
        sh.flush(&shard, now);
        sh.publish();
        if draining && sh.core.allocations() == 0 {
            break;
        }
    }
}

impl Shard {
    fn publish(&mut self) {
        let active = self.core.allocations();
        let ports = self.ports.available();
        self.publisher.publish(
            &self.metrics,
            self.core.stats(),
            active,
            ports,
            &self.driver_drops,
        );
    }

    /// Drains the core's outputs. Binding a relay socket answers the core at once, which may
    /// queue more outputs; the loop takes those too.
    fn flush(&mut self, shard: &ShardRef, now: Instant) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit(t) => {
                    let payload = self.core.payload(&t);
                    let sent = match t.dest {
                        Dest::Client(five) => self
                            .listeners
                            .iter()
                            .find(|l| l.local == five.server)
                            .map(|l| l.socket.try_send_to(payload, five.client)),
                        Dest::Peer { relay, peer } => self
                            .relays
                            .get(relay.index())
                            .and_then(Option::as_ref)
                            .filter(|r| r.id == relay)
                            .map(|r| r.socket.try_send_to(payload, peer)),
                    };
                    match sent {
                        Some(Ok(_)) => {}
                        Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.driver_drops[DriverDrop::SendWouldBlock.index()] += 1;
                        }
                        Some(Err(_)) | None => {
                            self.driver_drops[DriverDrop::SendError.index()] += 1;
                        }
                    }
                }
                Output::BindRelay(req) => {
                    let result = self.bind_relay(shard, req.relay, req.ip, req.even_port);
                    self.core.handle_relay_bound(now, req.relay, result);
                }
                Output::ReleaseRelay(id) => self.release(id),
                Output::Event(e) => debug!(event = ?e, "relay event"),
            }
        }
    }

    fn bind_relay(
        &mut self,
        shard: &ShardRef,
        id: RelayId,
        ip: std::net::IpAddr,
        even: bool,
    ) -> Result<SocketAddr, BindError> {
        // A port may still be held by a socket whose task has not been dropped yet, or by
        // another program: try a few before answering 508.
        const BIND_ATTEMPTS: usize = 8;
        for _ in 0..BIND_ATTEMPTS {
            let port = if even {
                self.ports.take_even()
            } else {
                self.ports.take()
            };
            let Some(port) = port else {
                return Err(BindError::PortsExhausted);
            };
            let bound = StdUdpSocket::bind(SocketAddr::new(ip, port)).and_then(|s| {
                s.set_nonblocking(true)?;
                let addr = s.local_addr()?;
                Ok((UdpSocket::from_std(s)?, addr))
            });
            match bound {
                Ok((socket, addr)) => {
                    let socket = Rc::new(socket);
                    let task = tokio::task::spawn_local(relay_task(
                        Rc::clone(shard),
                        id,
                        Rc::clone(&socket),
                    ));
                    let slot = id.index();
                    if self.relays.len() <= slot {
                        self.relays.resize_with(slot + 1, || None);
                    }
                    self.relays[slot] = Some(Relay {
                        id,
                        port,
                        socket,
                        task,
                    });
                    return Ok(addr);
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    // Someone else has it; back of the queue, try the next.
                    self.ports.put(port);
                }
                Err(e) => {
                    self.ports.put(port);
                    warn!(error = %e, "binding a relay socket failed");
                    return Err(BindError::System);
                }
            }
        }
        Err(BindError::PortsExhausted)
    }

    fn release(&mut self, id: RelayId) {
        if let Some(slot) = self.relays.get_mut(id.index()) {
            if slot.as_ref().is_some_and(|r| r.id == id) {
                if let Some(r) = slot.take() {
                    r.task.abort();
                    self.ports.put(r.port);
                }
            }
        }
    }
}
