//! Grants: what a caller can read or settle outside what it was granted.
