//! A window onto part of a seekable device (one partition of a disk or disk image), seen as a
//! device of its own: the builder's filesystem writers and the update agent's partition writes and
//! read-backs work on a partition in place through it, and can never touch bytes outside it.

use std::io::{self, Read, Seek, SeekFrom, Write};

/// Reads into `buf` until it is full or the reader ends (retrying interrupted reads); returns
/// how many bytes were read, less than `buf.len()` only at the end of the input.
pub fn read_full<R: Read + ?Sized>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Bytes `start..start + len` of `inner`. Every read and write seeks `inner` first, so the device
/// may be shared with other users between calls.
#[derive(Debug)]
pub struct Slice<D> {
    inner: D,
    start: u64,
    len: u64,
    pos: u64,
}

impl<D: Seek> Slice<D> {
    /// A window of `len` bytes at `start`, positioned at its beginning.
    pub fn new(inner: D, start: u64, len: u64) -> Slice<D> {
        Slice {
            inner,
            start,
            len,
            pos: 0,
        }
    }

    /// Size of the window in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device (for `sync_data` and the like; a read or write through it may move its position).
    pub fn get_mut(&mut self) -> &mut D {
        &mut self.inner
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
        }
        .filter(|t| *t <= self.len)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("seek outside a {}-byte partition", self.len),
            )
        })?;
        self.pos = target;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn slice_reads_and_writes_only_its_window() {
        let mut slice = Slice::new(Cursor::new(vec![0u8; 16]), 4, 8);
        assert_eq!((slice.len(), slice.is_empty()), (8, false));
        assert_eq!(slice.seek(SeekFrom::End(0)).expect("seek"), 8);
        assert!(slice.seek(SeekFrom::End(1)).is_err(), "past the end");
        assert!(
            slice.seek(SeekFrom::Current(-9)).is_err(),
            "before the start"
        );
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

    #[test]
    fn the_device_may_move_between_calls() {
        let mut device = Cursor::new((0u8..32).collect::<Vec<_>>());
        let mut slice = Slice::new(&mut device, 8, 16);
        let mut two = [0u8; 2];
        slice.read_exact(&mut two).expect("read");
        slice
            .get_mut()
            .seek(SeekFrom::Start(0))
            .expect("move the device");
        slice.read_exact(&mut two).expect("read on");
        assert_eq!(two, [10, 11]);
    }
}
