//! A window onto part of a seekable device (one partition of a disk image), so filesystem
//! writers that expect a whole device can work on a partition in place.

use std::io::{self, Read, Seek, SeekFrom, Write};

/// Bytes `start..start + len` of `inner`, seen as a device of its own.
#[derive(Debug)]
pub struct Slice<D> {
    inner: D,
    start: u64,
    len: u64,
    pos: u64,
}

impl<D: Seek> Slice<D> {
    /// A window of `len` bytes at `start`.
    pub fn new(inner: D, start: u64, len: u64) -> Slice<D> {
        Slice {
            inner,
            start,
            len,
            pos: 0,
        }
    }

    /// Gives back the device.
    pub fn into_inner(self) -> D {
        self.inner
    }

    fn remaining(&self, want: usize) -> usize {
        let left = self.len.saturating_sub(self.pos);
        want.min(usize::try_from(left).unwrap_or(usize::MAX))
    }
}

impl<D: Read + Seek> Read for Slice<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.remaining(buf.len());
        if n == 0 {
            return Ok(0);
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let read = self.inner.read(&mut buf[..n])?;
        self.pos += read as u64;
        Ok(read)
    }
}

impl<D: Write + Seek> Write for Slice<D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.remaining(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("write past the end of a {}-byte partition", self.len),
            ));
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let written = self.inner.write(&buf[..n])?;
        self.pos += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<D: Seek> Seek for Slice<D> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of a partition",
            )),
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn slice_reads_and_writes_only_its_window() {
        let mut slice = Slice::new(Cursor::new(vec![0u8; 16]), 4, 8);
        assert_eq!(slice.seek(SeekFrom::End(0)).expect("seek"), 8);
        slice.seek(SeekFrom::Start(6)).expect("seek");
        assert_eq!(slice.write(b"abcd").expect("write"), 2);
        assert!(slice.write(b"cd").is_err());
        slice.seek(SeekFrom::Start(0)).expect("seek");
        let mut all = Vec::new();
        slice.read_to_end(&mut all).expect("read");
        assert_eq!(all, b"\0\0\0\0\0\0ab");
        let disk = slice.into_inner().into_inner();
        assert_eq!(&disk[10..12], b"ab");
        assert_eq!(disk[12..], [0; 4]);
    }
}
