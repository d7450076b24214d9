//! Partition windows for the disk writers and readers: [`Slice`] (shared with the update agent,
//! from `os-config`) and [`ReadOnly`].

use std::io::{self, Read, Seek, SeekFrom, Write};

pub use os_config::slice::Slice;

/// A device opened for reading that refuses writes (for readers, like `fatfs`, that ask for
/// `Write` though they only read).
#[derive(Debug)]
pub struct ReadOnly<D>(pub D);

impl<D: Read> Read for ReadOnly<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<D> Write for ReadOnly<D> {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the disk image is opened read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<D: Seek> Seek for ReadOnly<D> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.0.seek(to)
    }
}
