//! AFL++ driver of the `chunk-index` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::chunk_index(data));
}
