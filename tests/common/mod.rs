pub(crate) mod browser;
pub(crate) mod node;
pub(crate) mod serve;
pub(crate) mod turn;
pub(crate) mod ws;
