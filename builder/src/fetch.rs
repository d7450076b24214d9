//! HTTP and file downloads with retries.
