pub(crate) mod browser;
pub(crate) mod node;
pub(crate) mod serve;
pub(crate) mod ws;
