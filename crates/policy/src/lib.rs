//! tsunagi-policy
