//! tsunagi-validation
