//! AFL++ driver of the `tar` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::tar(data));
}
