//! Extraction of index values from a resource, driven by the compiled search paths.
