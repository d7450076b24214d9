//! Plinth on-target library.
