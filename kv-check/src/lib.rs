//! Linearizability checking of key-value histories (placeholder).
