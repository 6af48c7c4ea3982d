//! In-memory store (placeholder: being implemented).

/// The in-memory [`super::Store`].
#[derive(Debug, Default)]
pub struct MemoryStore {}
