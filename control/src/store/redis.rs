//! Redis store (placeholder: being implemented).

/// The Redis [`super::Store`].
#[derive(Debug)]
pub struct RedisStore {}
