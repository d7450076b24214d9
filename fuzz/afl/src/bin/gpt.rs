//! AFL++ driver of the `gpt` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::gpt(data));
}
