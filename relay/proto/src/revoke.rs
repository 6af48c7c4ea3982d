//! The revocation table of one shard: "credential group G is refused until Unix time U".
//!
//! REST credentials are stateless HMACs, so ending a call cannot un-mint them; the control plane
//! instead revokes the call's group, and the relay remembers that until the credentials would
//! have expired anyway. Groups nest ([`crate::auth::RestUsername::groups`]): kicking one
//! participant revokes `CALL.PEER`, ending the call revokes `CALL`, and each is one entry here.
//! A username is refused when any of its groups is held, so an Allocate costs one lookup per
//! group of its username (at most [`crate::auth::MAX_GROUP_SEGMENTS`]), each on a borrowed
//! slice of the username. The table is bounded ([`crate::Config::max_revoked_groups`]): past the
//! bound, the entry that expires soonest goes first, since it protects the least.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Groups (any depth, `CALL` or `CALL.PEER`, as plain strings: the table knows nothing of
/// nesting) and the Unix time (seconds, inclusive) until which each is refused. Two indexes over
/// one shared string per group: by name for the lookup on every authenticated request, by
/// expiry for pruning and eviction without a scan.
#[derive(Debug)]
pub(crate) struct Revocations {
    max: usize,
    by_group: HashMap<Arc<str>, u64, ahash::RandomState>,
    by_until: BTreeSet<(u64, Arc<str>)>,
}

impl Revocations {
    /// An empty table holding at most `max` groups.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            by_group: HashMap::default(),
            by_until: BTreeSet::new(),
        }
    }

    /// Groups held.
    pub(crate) fn len(&self) -> usize {
        self.by_group.len()
    }

    /// Whether no group is held: the common case, which skips parsing usernames.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_group.is_empty()
    }

    /// Whether `group` is refused at `now_unix`. Inclusive like the credential expiry it mirrors:
    /// a credential still works in its expiry second, so its revocation holds through it too.
    pub(crate) fn is_revoked(&self, group: &str, now_unix: u64) -> bool {
        self.by_group.get(group).is_some_and(|&u| now_unix <= u)
    }

    /// Refuses `group` until `until_unix`, keeping the later time if it is already refused.
    /// Returns how many groups were evicted to stay within the bound (the new one may itself be
    /// the one evicted, when it expires before every other).
    pub(crate) fn insert(&mut self, group: &str, until_unix: u64) -> usize {
        if let Some((name, until)) = self.by_group.get_key_value(group) {
            if *until >= until_unix {
                return 0;
            }
            let name = Arc::clone(name);
            self.by_until.remove(&(*until, Arc::clone(&name)));
            self.by_until.insert((until_unix, Arc::clone(&name)));
            self.by_group.insert(name, until_unix);
            return 0;
        }
        let name: Arc<str> = group.into();
        self.by_group.insert(Arc::clone(&name), until_unix);
        self.by_until.insert((until_unix, name));
        let mut evicted = 0;
        while self.by_group.len() > self.max {
            let Some((_, name)) = self.by_until.pop_first() else {
                break;
            };
            self.by_group.remove(&name);
            evicted += 1;
        }
        evicted
    }

    /// Forgets groups whose time is over at `now_unix`; returns how many.
    pub(crate) fn prune(&mut self, now_unix: u64) -> usize {
        let mut pruned = 0;
        while let Some((until, _)) = self.by_until.first() {
            if *until >= now_unix {
                break;
            }
            if let Some((_, name)) = self.by_until.pop_first() {
                self.by_group.remove(&name);
                pruned += 1;
            }
        }
        pruned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_through_the_until_second_then_pruned() {
        let mut r = Revocations::new(10);
        assert_eq!(r.insert("g", 100), 0);
        assert!(r.is_revoked("g", 99));
        assert!(r.is_revoked("g", 100));
        assert!(!r.is_revoked("g", 101));
        assert!(!r.is_revoked("other", 50));
        assert_eq!(r.prune(100), 0);
        assert_eq!(r.len(), 1);
        assert_eq!(r.prune(101), 1);
        assert_eq!(r.len(), 0);
        assert!(!r.is_revoked("g", 50));
    }

    #[test]
    fn the_later_until_wins() {
        let mut r = Revocations::new(10);
        r.insert("g", 200);
        r.insert("g", 100);
        assert!(r.is_revoked("g", 150));
        r.insert("g", 300);
        assert!(r.is_revoked("g", 250));
        // The old expiry left the index too: pruning past it keeps the group.
        assert_eq!(r.prune(250), 0);
        assert_eq!(r.len(), 1);
        assert_eq!(r.by_until.len(), 1);
        assert_eq!(r.prune(301), 1);
        assert_eq!(r.by_until.len(), 0);
    }

    #[test]
    fn full_table_evicts_the_soonest_expiring() {
        let mut r = Revocations::new(3);
        r.insert("a", 300);
        r.insert("b", 100);
        r.insert("c", 200);
        assert_eq!(r.insert("d", 400), 1);
        assert_eq!(r.len(), 3);
        assert!(!r.is_revoked("b", 0), "b expired first, so it went");
        for g in ["a", "c", "d"] {
            assert!(r.is_revoked(g, 0), "{g}");
        }
        // A newcomer expiring before everyone else is the one that goes.
        assert_eq!(r.insert("e", 50), 1);
        assert!(!r.is_revoked("e", 0));
        assert_eq!(r.len(), 3);
        // Updating a present group never evicts.
        assert_eq!(r.insert("a", 500), 0);
        assert_eq!((r.len(), r.by_until.len()), (3, 3));
    }

    #[test]
    fn a_participant_group_and_its_call_group_are_separate_entries() {
        let mut r = Revocations::new(10);
        r.insert("call.p_kicked", 100);
        assert!(r.is_revoked("call.p_kicked", 50));
        assert!(
            !r.is_revoked("call", 50),
            "kicking one does not end the call"
        );
        assert!(!r.is_revoked("call.p_other", 50));
        r.insert("call", 200);
        assert_eq!(r.len(), 2);
        assert_eq!(r.prune(101), 1);
        assert!(r.is_revoked("call", 150));
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut r = Revocations::new(0);
        assert_eq!(r.insert("a", 300), 1);
        assert_eq!((r.len(), r.by_until.len()), (0, 0));
    }
}
