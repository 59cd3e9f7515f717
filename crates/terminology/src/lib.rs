//! tsunagi-terminology
