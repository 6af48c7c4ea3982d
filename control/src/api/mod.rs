//! The HTTP API (placeholder: being implemented).
