//! Compressed objects: gzip and zstd, recognised by their magic bytes (and, when `Content-Encoding`
//! or the key's suffix claims a compression, checked against them), decompressed as a stream — chunk
//! by chunk as the object is downloaded, never whole in memory and never on disk twice — within a
//! bound on the decompressed size and on the ratio, so that a decompression bomb is a permanent
//! failure of its file with the reason, and the daemon unharmed.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// `spool.max_decompressed_bytes` by default: what one object may decompress to.
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: u64 = 64 << 30;
/// `spool.max_compression_ratio` by default: CSV and JSON lines compress 3-20 times with gzip, up to
/// ~50 with zstd on very repetitive files; a bomb thousands of times.
pub const DEFAULT_MAX_RATIO: u64 = 200;
/// The ratio is judged once this much has been decompressed: a small file may compress very well.
/// (So decompression holds at most this plus `ratio` times a chunk in memory at once.)
pub const RATIO_GRACE_BYTES: u64 = 16 << 20;

/// The bounds on one object's decompression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_ratio: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: DEFAULT_MAX_DECOMPRESSED_BYTES,
            max_ratio: DEFAULT_MAX_RATIO,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Zstd,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Zstd => "zstd",
        }
    }

    fn of_magic(head: &[u8]) -> Option<Encoding> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(Encoding::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Encoding::Zstd)
        } else {
            None
        }
    }
}

/// The bytes [`detect`] needs to see of an object's start.
pub const MAGIC_BYTES: usize = 4;

/// Why an object could not be decompressed: permanent for that object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecompressError {
    /// Past `max_decompressed_bytes` or `max_compression_ratio`.
    #[error("{0}")]
    Bomb(String),
    /// Not the compression it claims, or corrupt.
    #[error("{0}")]
    Corrupt(String),
}

/// The compression of an object: by its first bytes; a claim (`Content-Encoding: gzip`, a `.gz` or
/// `.zst` key) that they do not bear out is an error. `None`: plain.
pub fn detect(
    content_encoding: Option<&str>,
    key: &str,
    head: &[u8],
) -> Result<Option<Encoding>, DecompressError> {
    let by_header = content_encoding.and_then(|ce| {
        // "gzip", "x-gzip", or a list whose last coding is the outermost.
        match ce.rsplit(',').next()?.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Some((Encoding::Gzip, "its Content-Encoding")),
            "zstd" => Some((Encoding::Zstd, "its Content-Encoding")),
            _ => None,
        }
    });
    let lower = key.to_ascii_lowercase();
    let by_suffix = if lower.ends_with(".gz") || lower.ends_with(".gzip") {
        Some((Encoding::Gzip, "its key's suffix"))
    } else if lower.ends_with(".zst") || lower.ends_with(".zstd") {
        Some((Encoding::Zstd, "its key's suffix"))
    } else {
        None
    };
    let magic = Encoding::of_magic(head);
    if let Some(m) = magic {
        return Ok(Some(m));
    }
    match by_header.or(by_suffix) {
        Some((claimed, how)) => Err(DecompressError::Corrupt(format!(
            "{how} says {} but the object does not start with {}'s magic bytes (an uncompressed \
             file under a compressed name, or a damaged one)",
            claimed.name(),
            claimed.name()
        ))),
        None => Ok(None),
    }
}

/// Where decompressed bytes go: held until the caller takes them, counted against the limits.
struct Sink {
    out: Vec<u8>,
    total_in: u64,
    total_out: u64,
    limits: Limits,
    bomb: Option<String>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let total = self.total_out + buf.len() as u64;
        let reason = if total > self.limits.max_bytes {
            Some(format!(
                "it decompresses to more than {} bytes (spool.max_decompressed_bytes)",
                self.limits.max_bytes
            ))
        } else if total > RATIO_GRACE_BYTES
            && total > self.limits.max_ratio.saturating_mul(self.total_in)
        {
            Some(format!(
                "it decompresses to more than {} times its compressed size ({} bytes from {}; \
                 spool.max_compression_ratio): a decompression bomb?",
                self.limits.max_ratio, total, self.total_in
            ))
        } else {
            None
        };
        if let Some(r) = reason {
            self.bomb = Some(r);
            return Err(io::Error::other("decompression limit"));
        }
        self.total_out = total;
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Decoder {
    Gzip(flate2::write::MultiGzDecoder<Sink>),
    Zstd(zstd::stream::write::Decoder<'static, Sink>),
}

/// One object's decompression, fed its compressed bytes chunk by chunk.
pub struct Stream {
    decoder: Decoder,
    encoding: Encoding,
}

impl Stream {
    pub fn new(encoding: Encoding, limits: Limits) -> io::Result<Stream> {
        let sink = Sink {
            out: Vec::new(),
            total_in: 0,
            total_out: 0,
            limits,
            bomb: None,
        };
        let decoder = match encoding {
            Encoding::Gzip => Decoder::Gzip(flate2::write::MultiGzDecoder::new(sink)),
            Encoding::Zstd => Decoder::Zstd(zstd::stream::write::Decoder::new(sink)?),
        };
        Ok(Stream { decoder, encoding })
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    fn sink(&mut self) -> &mut Sink {
        match &mut self.decoder {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zstd(d) => d.get_mut(),
        }
    }

    fn failed(&mut self, e: io::Error) -> DecompressError {
        let name = self.encoding.name();
        match self.sink().bomb.take() {
            Some(b) => DecompressError::Bomb(b),
            None => DecompressError::Corrupt(format!("its {name} data is corrupt: {e}")),
        }
    }

    /// Decompress one chunk; the decompressed bytes are then in [`Stream::take`].
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), DecompressError> {
        self.sink().total_in += chunk.len() as u64;
        let r = match &mut self.decoder {
            Decoder::Gzip(d) => d.write_all(chunk),
            Decoder::Zstd(d) => d.write_all(chunk),
        };
        r.map_err(|e| self.failed(e))
    }

    /// The end of the compressed bytes: the rest of the output is in [`Stream::take`].
    pub fn finish(&mut self) -> Result<(), DecompressError> {
        let r = match &mut self.decoder {
            Decoder::Gzip(d) => d.try_finish(),
            Decoder::Zstd(d) => d.flush(),
        };
        r.map_err(|e| self.failed(e))
    }

    /// The bytes decompressed since the last call (the buffer is reused: write them out, then clear).
    pub fn take(&mut self) -> &mut Vec<u8> {
        &mut self.sink().out
    }
}

/// A local file, decompressed into `dest` when it is compressed (`Ok(None)`: it is not; read it as it
/// is). The dry run's way to read a `.gz` or `.zst` file.
pub fn decompress_local(
    path: &Path,
    dest: &Path,
    limits: Limits,
) -> Result<Option<PathBuf>, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut head = [0u8; MAGIC_BYTES];
    let n = read_up_to(&mut file, &mut head).map_err(|e| format!("cannot read it: {e}"))?;
    let key = path.to_string_lossy();
    let Some(enc) = detect(None, &key, &head[..n]).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let mut stream = Stream::new(enc, limits).map_err(|e| e.to_string())?;
    let mut out = std::fs::File::create(dest)
        .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let mut write = |stream: &mut Stream| -> Result<(), String> {
        let buf = stream.take();
        out.write_all(buf)
            .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        buf.clear();
        Ok(())
    };
    stream.feed(&head[..n]).map_err(|e| e.to_string())?;
    write(&mut stream)?;
    let mut chunk = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut chunk)
            .map_err(|e| format!("cannot read it: {e}"))?;
        if n == 0 {
            break;
        }
        stream.feed(&chunk[..n]).map_err(|e| e.to_string())?;
        write(&mut stream)?;
    }
    stream.finish().map_err(|e| e.to_string())?;
    write(&mut stream)?;
    Ok(Some(dest.to_path_buf()))
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn roundtrip(
        enc: Encoding,
        compressed: &[u8],
        limits: Limits,
    ) -> Result<Vec<u8>, DecompressError> {
        let mut s = Stream::new(enc, limits).unwrap();
        let mut out = Vec::new();
        for chunk in compressed.chunks(1000) {
            s.feed(chunk)?;
            out.append(s.take());
        }
        s.finish()?;
        out.append(s.take());
        Ok(out)
    }

    #[test]
    fn gzip_and_zstd_decompress_in_chunks() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{i},row\n").into_bytes())
            .collect();
        let gz = gzip(&data);
        assert_eq!(
            roundtrip(Encoding::Gzip, &gz, Limits::default()).unwrap(),
            data
        );
        let zst = zstd::encode_all(&data[..], 3).unwrap();
        assert_eq!(
            roundtrip(Encoding::Zstd, &zst, Limits::default()).unwrap(),
            data
        );
        // Two gzip members one after the other (`cat a.gz b.gz`) are one file.
        let mut two = gzip(b"a\n");
        two.extend(gzip(b"b\n"));
        assert_eq!(
            roundtrip(Encoding::Gzip, &two, Limits::default()).unwrap(),
            b"a\nb\n"
        );
    }

    #[test]
    fn detection_goes_by_magic_bytes_and_checks_claims() {
        let gz = gzip(b"x");
        assert_eq!(detect(None, "a.csv", &gz[..4]), Ok(Some(Encoding::Gzip)));
        assert_eq!(
            detect(Some("gzip"), "a.csv", &gz[..4]),
            Ok(Some(Encoding::Gzip))
        );
        assert_eq!(detect(None, "a.csv", b"Regi"), Ok(None));
        assert_eq!(detect(None, "a.csv", b""), Ok(None));
        let e = detect(None, "a.csv.gz", b"Regi").unwrap_err().to_string();
        assert!(e.contains("suffix says gzip"), "{e}");
        let e = detect(Some("zstd"), "a", b"Regi").unwrap_err().to_string();
        assert!(e.contains("Content-Encoding says zstd"), "{e}");
        assert_eq!(
            detect(None, "A.ZST", &[0x28, 0xb5, 0x2f, 0xfd]),
            Ok(Some(Encoding::Zstd))
        );
    }

    #[test]
    fn bombs_and_corrupt_data_are_refused_with_the_reason() {
        let zeros = vec![0u8; 64 << 20];
        let gz = gzip(&zeros);
        assert!(gz.len() < (1 << 20), "{}", gz.len());
        let e = roundtrip(Encoding::Gzip, &gz, Limits::default()).unwrap_err();
        assert!(
            matches!(&e, DecompressError::Bomb(m) if m.contains("max_compression_ratio")),
            "{e:?}"
        );
        let small = Limits {
            max_bytes: 1 << 20,
            max_ratio: 100_000,
        };
        let e = roundtrip(Encoding::Gzip, &gz, small).unwrap_err();
        assert!(
            matches!(&e, DecompressError::Bomb(m) if m.contains("max_decompressed_bytes")),
            "{e:?}"
        );
        let mut bad = gzip(b"hello world, hello world");
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        bad[mid + 1] ^= 0xff;
        let e = roundtrip(Encoding::Gzip, &bad, Limits::default()).unwrap_err();
        assert!(matches!(e, DecompressError::Corrupt(_)), "{e:?}");
    }
}
