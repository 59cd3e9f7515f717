//! Bundle construction helpers.
