//! tsunagi-server
