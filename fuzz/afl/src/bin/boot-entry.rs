//! AFL++ driver of the `boot-entry` fuzz target.

fn main() {
    afl::fuzz!(|data: &[u8]| fuzz_targets::boot_entry(data));
}
