//! Issue 18 items of this area; see `main.rs`.
