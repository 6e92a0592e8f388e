//! An uncompressed metrics body kept compressed while it is held, and unpacked a block at
//! a time as the client reads it.
//!
//! A relay's plain-text body is tens of megabytes (175,000 series: ~26 MB), and a scraper
//! that asks for it without gzip (curl, some agents) keeps it alive until it has read it or
//! its write timeout cuts it off: held as one buffer, a few slow readers made the agent's
//! peak memory. Here the text is cut into [`BLOCK`]-byte blocks, each compressed with LZ4
//! as it is written (a Prometheus body shrinks 5-10x) into one shared buffer, and a client
//! holds only the shared buffer plus the block or two hyper has queued for its socket (its
//! write buffer is capped at the same size). LZ4 because it unpacks at gigabytes a second:
//! the price of a plain scrape stays in the noise of rendering it.

use std::{
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Uncompressed bytes per block: small enough that what a stalled client holds unpacked
/// stays small, big enough for LZ4 to find the label sets that repeat line after line.
pub const BLOCK: usize = 16 * 1024;

/// One block: where its compressed bytes end in [`Packed::data`] and its length unpacked.
#[derive(Clone, Copy, Debug)]
struct Block {
    end: usize,
    len: usize,
}

/// A text as compressed blocks; cheap to share ([`Packed::body`] takes an `Arc`).
#[derive(Debug)]
pub struct Packed {
    data: Bytes,
    blocks: Vec<Block>,
    len: u64,
}

impl Packed {
    /// The text's length unpacked.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The compressed size held.
    #[cfg(test)]
    pub fn packed_len(&self) -> usize {
        self.data.len()
    }

    /// The text as an HTTP body: exact length (hyper sends it as Content-Length), one
    /// block unpacked per frame.
    pub fn body(self: &Arc<Self>) -> Unpacking {
        Unpacking {
            packed: self.clone(),
            next: 0,
            left: self.len,
        }
    }

    /// The whole text unpacked (tests, and callers that want it whole).
    #[cfg(test)]
    pub fn unpack(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(self.len as usize);
        for i in 0..self.blocks.len() {
            out.extend_from_slice(&self.block(i)?);
        }
        Ok(out)
    }

    /// Block `i` unpacked: exactly its length, or an error.
    fn block(&self, i: usize) -> Result<Bytes, String> {
        let Some(b) = self.blocks.get(i) else {
            return Ok(Bytes::new());
        };
        let start = i.checked_sub(1).map_or(0, |p| self.blocks[p].end);
        let packed = self.data.get(start..b.end).ok_or("out of range")?;
        let mut out = vec![0u8; b.len];
        match lz4_flex::block::decompress_into(packed, &mut out) {
            Ok(n) if n == b.len => Ok(Bytes::from(out)),
            Ok(n) => Err(format!("{n} bytes instead of {}", b.len)),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A `fmt::Write` that packs what is written to it, a block at a time.
pub struct Packer {
    text: String,
    data: Vec<u8>,
    blocks: Vec<Block>,
    len: u64,
}

impl Default for Packer {
    fn default() -> Self {
        Packer {
            text: String::with_capacity(BLOCK),
            data: Vec::new(),
            blocks: Vec::new(),
            len: 0,
        }
    }
}

impl Packer {
    /// Compresses the buffered text as one block.
    fn seal(&mut self) -> fmt::Result {
        if self.text.is_empty() {
            return Ok(());
        }
        let start = self.data.len();
        let max = lz4_flex::block::get_maximum_output_size(self.text.len());
        self.data.resize(start + max, 0);
        // Cannot fail with room for the worst case; were it to, the rendering fails rather
        // than the body coming out wrong.
        let n = lz4_flex::block::compress_into(self.text.as_bytes(), &mut self.data[start..])
            .map_err(|_| fmt::Error)?;
        self.data.truncate(start + n);
        self.blocks.push(Block {
            end: start + n,
            len: self.text.len(),
        });
        self.len += self.text.len() as u64;
        self.text.clear();
        Ok(())
    }

    pub fn finish(mut self) -> Result<Packed, fmt::Error> {
        self.seal()?;
        // What is held is the compressed size, not the capacity its growth left.
        self.data.shrink_to_fit();
        Ok(Packed {
            data: Bytes::from(self.data),
            blocks: self.blocks,
            len: self.len,
        })
    }
}

impl fmt::Write for Packer {
    fn write_str(&mut self, mut s: &str) -> fmt::Result {
        // Fill the block up to BLOCK bytes when a write crosses it (to the char boundary
        // before it), so every block but the last is all but full.
        while self.text.len() + s.len() > BLOCK {
            let mut room = BLOCK - self.text.len();
            while !s.is_char_boundary(room) {
                room -= 1;
            }
            let (now, later) = s.split_at(room);
            self.text.push_str(now);
            self.seal()?;
            s = later;
        }
        self.text.push_str(s);
        Ok(())
    }
}

/// [`Packed`] as a hyper body.
pub struct Unpacking {
    packed: Arc<Packed>,
    next: usize,
    left: u64,
}

impl Body for Unpacking {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.next >= self.packed.blocks.len() {
            return Poll::Ready(None);
        }
        let i = self.next;
        self.next += 1;
        Poll::Ready(Some(match self.packed.block(i) {
            Ok(b) => {
                self.left = self.left.saturating_sub(b.len() as u64);
                Ok(Frame::data(b))
            }
            // Only a bug can get here: the connection is cut (the client sees a short
            // body against its Content-Length), never sent a wrong one.
            Err(e) => Err(std::io::Error::other(format!(
                "unpacking block {i} of the metrics body: {e}"
            ))),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.packed.blocks.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use http_body_util::BodyExt as _;

    use super::*;

    /// Metrics-shaped text written label by label, with multi-byte characters astride block
    /// edges: unpacked, byte for byte what was written; every block but the last full; far
    /// smaller held; as a body, the same bytes with an exact length, in one frame a block.
    #[tokio::test]
    async fn what_is_written_is_what_is_read() {
        let mut want = String::new();
        let mut p = Packer::default();
        for i in 0..40_000u64 {
            for part in [
                "wirescope_tunnel_packets_total{interface=\"wg-ü",
                &format!("{}\",peer=\"peer-{i}\",direction=\"tx\"}} ", i % 7),
                &format!("{}\n", i * 1_000_003),
            ] {
                want.push_str(part);
                p.write_str(part).unwrap();
            }
        }
        let packed = Arc::new(p.finish().unwrap());
        assert_eq!(packed.len(), want.len() as u64);
        assert_eq!(packed.unpack().unwrap(), want.as_bytes());
        let full = packed.blocks.len();
        assert!(full >= want.len().div_ceil(BLOCK), "{full} blocks");
        // A char is at most 4 bytes: a block ends at most 3 short of BLOCK.
        assert!(
            packed.blocks[..full - 1]
                .iter()
                .all(|b| b.len <= BLOCK && b.len > BLOCK - 4)
        );
        assert!(
            packed.blocks.iter().any(|b| b.len < BLOCK),
            "no ü astride an edge"
        );
        assert!(
            packed.packed_len() * 4 < want.len(),
            "{} packed of {}",
            packed.packed_len(),
            want.len()
        );

        let body = packed.body();
        assert_eq!(body.size_hint().exact(), Some(want.len() as u64));
        let mut frames = 0;
        let mut got = Vec::new();
        let mut body = std::pin::pin!(body);
        while let Some(f) = body.frame().await {
            let data = f.unwrap().into_data().unwrap();
            assert!(data.len() <= BLOCK);
            got.extend_from_slice(&data);
            frames += 1;
            assert_eq!(
                body.size_hint().exact(),
                Some((want.len() - got.len()) as u64)
            );
        }
        assert_eq!(frames, full);
        assert_eq!(got, want.as_bytes());

        // Nothing written: an empty body, ended at once.
        let empty = Arc::new(Packer::default().finish().unwrap());
        assert_eq!(empty.len(), 0);
        let body = empty.body();
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }

    /// A damaged block is an error frame (hyper cuts the connection), not wrong bytes.
    #[tokio::test]
    async fn a_damaged_block_is_an_error() {
        let mut p = Packer::default();
        p.write_str(&"x".repeat(3 * BLOCK)).unwrap();
        let mut packed = p.finish().unwrap();
        let mut data = packed.data.to_vec();
        data[packed.blocks[0].end - 1] ^= 0xff;
        data.truncate(packed.blocks[0].end - 2);
        packed.blocks[0].end -= 2;
        packed.data = Bytes::from(data);
        packed.blocks.truncate(1);
        let mut body = std::pin::pin!(Arc::new(packed).body());
        let frame = body.frame().await.unwrap();
        let err = frame.unwrap_err().to_string();
        assert!(err.contains("unpacking block 0"), "{err}");
    }
}
