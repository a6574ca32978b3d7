//! The streaming pipeline, in constant memory whatever the size of the backup.
//!
//! Storing: a source writes into zstd → age (optional) → SHA-256 and byte count, on a blocking
//! thread; the resulting object bytes cross a bounded channel in [`CHUNK`]-sized pieces to the
//! async side, which uploads them through object_store's `BufWriter` (one `put` for a small
//! object, a multipart upload of [`PART`]-sized parts, at most [`PARTS_IN_FLIGHT`] at a time, for
//! a large one). Nothing is committed to the store unless the source finished cleanly: any
//! error aborts the upload. Compression and encryption run off the async runtime, so a large
//! backup does not stall other jobs' tasks.
//!
//! Loading reverses it: the async side streams the object into the channel, the blocking side
//! hashes, decrypts, decompresses and hands a reader of the original bytes to a consumer (a
//! tar unpacker, `pg_restore`'s stdin, a byte counter).
//!
//! Memory bound: CHUNK × (channel depth + 2) + PART × (PARTS_IN_FLIGHT + 1) + zstd's window
//! (8 MiB at level ≤ 19 with the default window log) + age's 64 KiB chunk.

use std::{
    io::{self, BufReader, Read, Write},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, buffered::BufWriter, path::Path};
use sha2::{Digest, Sha256};
use tokio::{io::AsyncWriteExt, sync::mpsc};

/// Size of the pieces handed from the encoder to the uploader and from the downloader to the
/// decoder.
const CHUNK: usize = 256 * 1024;
/// Pieces waiting in the channel between the two sides.
const CHANNEL_DEPTH: usize = 4;
/// Multipart part size: S3's minimum, so memory stays small.
pub(crate) const PART: usize = 5 * 1024 * 1024;
/// Parts uploading at once.
const PARTS_IN_FLIGHT: usize = 2;

/// How the object is encoded.
pub(crate) struct Encoding {
    pub(crate) zstd_level: i32,
    /// Empty: not encrypted.
    pub(crate) recipients: Vec<age::x25519::Recipient>,
}

/// What a stored object turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stored {
    /// Bytes the source produced.
    pub(crate) source_bytes: u64,
    /// Bytes of the object in the store.
    pub(crate) stored_bytes: u64,
    /// Hex SHA-256 of the object.
    pub(crate) sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The source failed (its message says how).
    #[error("{0}")]
    Source(io::Error),
    #[error("uploading to the object store: {0}")]
    Upload(io::Error),
}

/// Streams what `produce` writes into the object `key` of `store`, encoded per `encoding`.
pub(crate) async fn store<F>(
    store: Arc<dyn ObjectStore>,
    key: Path,
    encoding: Encoding,
    produce: F,
) -> Result<Stored, StoreError>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let encoder = tokio::task::spawn_blocking(move || encode(tx, encoding, produce));
    let mut upload = BufWriter::with_capacity(store, key, PART).with_max_concurrency(PARTS_IN_FLIGHT);
    let mut upload_error = None;
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = upload.write_all(&chunk).await {
            upload_error = Some(e);
            break;
        }
    }
    // A producer still writing sees a broken pipe and stops.
    drop(rx);
    let encoded = match encoder.await {
        Ok(r) => r,
        Err(join) => Err(io::Error::other(format!("the backup encoder panicked: {join}"))),
    };
    match (upload_error, encoded) {
        (None, Ok(stored)) => match upload.shutdown().await {
            Ok(()) => Ok(stored),
            Err(e) => Err(StoreError::Upload(e)),
        },
        (Some(e), _) => {
            abort(&mut upload).await;
            Err(StoreError::Upload(e))
        }
        (None, Err(e)) => {
            abort(&mut upload).await;
            Err(StoreError::Source(e))
        }
    }
}

async fn abort(upload: &mut BufWriter) {
    if let Err(e) = upload.abort().await {
        tracing::warn!(error = %e, "aborting a partial upload failed; the store may keep its parts");
    }
}

fn encode<F>(tx: mpsc::Sender<Bytes>, encoding: Encoding, produce: F) -> io::Result<Stored>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()>,
{
    let sink = ChunkSink {
        tx,
        buf: Vec::with_capacity(CHUNK),
        hasher: Sha256::new(),
        bytes: 0,
    };
    let layer = if encoding.recipients.is_empty() {
        Layer::Plain(sink)
    } else {
        let recipients = encoding.recipients.iter().map(|r| r as &dyn age::Recipient);
        let encryptor = age::Encryptor::with_recipients(recipients).map_err(io::Error::other)?;
        Layer::Age(encryptor.wrap_output(sink)?)
    };
    let mut zstd = zstd::stream::write::Encoder::new(layer, encoding.zstd_level)?;
    // A frame checksum lets a verify without the digest still notice damage.
    zstd.include_checksum(true)?;
    let mut counted = Counting {
        inner: zstd,
        bytes: 0,
    };
    produce(&mut counted)?;
    let source_bytes = counted.bytes;
    let sink = counted.inner.finish()?.finish()?;
    let (stored_bytes, sha256) = sink.finish()?;
    Ok(Stored {
        source_bytes,
        stored_bytes,
        sha256,
    })
}

/// The object's bytes: hashed, counted, and sent to the uploader in [`CHUNK`]s.
struct ChunkSink {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    hasher: Sha256,
    bytes: u64,
}

impl ChunkSink {
    fn send(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Bytes::from(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }

    fn finish(mut self) -> io::Result<(u64, String)> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok((self.bytes, format!("{:x}", self.hasher.finalize())))
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.hasher.update(&data[..n]);
        self.bytes += n as u64;
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Layer {
    Plain(ChunkSink),
    Age(age::stream::StreamWriter<ChunkSink>),
}

impl Layer {
    fn finish(self) -> io::Result<ChunkSink> {
        match self {
            Layer::Plain(s) => Ok(s),
            Layer::Age(w) => w.finish(),
        }
    }
}

impl Write for Layer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Layer::Plain(s) => s.write(data),
            Layer::Age(w) => w.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Layer::Plain(s) => s.flush(),
            Layer::Age(w) => w.flush(),
        }
    }
}

struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streams object `key` and returns its hex SHA-256 and size, calling `progress` with each
/// chunk's size.
pub(crate) async fn digest(
    store: &dyn ObjectStore,
    key: &Path,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<(String, u64), object_store::Error> {
    let mut stream = store.get(key).await?.into_stream();
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        progress(chunk.len() as u64);
    }
    Ok((format!("{:x}", hasher.finalize()), bytes))
}

/// What a loaded object turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Loaded {
    pub(crate) stored_bytes: u64,
    pub(crate) sha256: String,
    /// Bytes after decryption and decompression.
    pub(crate) plain_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("reading from the object store: {0}")]
    Store(#[from] object_store::Error),
    /// The object could not be decrypted or decompressed: damaged, or the wrong identity.
    #[error("{0}")]
    Decode(String),
    /// The consumer failed (its message says how).
    #[error("{0}")]
    Consume(io::Error),
}

/// Marks reader errors that come from decoding the object rather than from the consumer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DecodeFailure(String);

/// Streams object `key` through SHA-256, age decryption (when `identities` is given) and zstd
/// decompression into `consume`, which reads the original bytes. The object is read to its end
/// (so the digest, the age authentication tags and the zstd checksum all cover every byte)
/// even when the consumer stops early.
pub(crate) async fn load<T, F>(
    store: &dyn ObjectStore,
    key: &Path,
    identities: Option<Vec<Box<dyn age::Identity + Send + Sync>>>,
    progress: &(dyn Fn(u64) + Send + Sync),
    consume: F,
) -> Result<(T, Loaded), LoadError>
where
    T: Send + 'static,
    F: FnOnce(&mut dyn Read) -> io::Result<T> + Send + 'static,
{
    let mut stream = store.get(key).await?.into_stream();
    let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let tally = Arc::new(Mutex::new((Sha256::new(), 0u64)));
    let decoder = {
        let tally = tally.clone();
        tokio::task::spawn_blocking(move || decode(rx, tally, identities, consume))
    };
    let mut store_error = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                progress(chunk.len() as u64);
                // A closed channel: the decoder failed, and says why below.
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                store_error = Some(e);
                break;
            }
        }
    }
    // The decoder sees the end of the object (or of what could be read of it).
    drop(tx);
    let decoded = decoder.await.unwrap_or_else(|join| {
        Err(LoadError::Consume(io::Error::other(format!(
            "the decoder panicked: {join}"
        ))))
    });
    if let Some(e) = store_error.take() {
        return Err(LoadError::Store(e));
    }
    let (value, plain_bytes) = decoded?;
    let (hasher, stored_bytes) = std::mem::take(&mut *tally.lock().expect("tally lock"));
    Ok((
        value,
        Loaded {
            stored_bytes,
            sha256: format!("{:x}", hasher.finalize()),
            plain_bytes,
        },
    ))
}

fn decode<T, F>(
    rx: mpsc::Receiver<Bytes>,
    tally: Arc<Mutex<(Sha256, u64)>>,
    identities: Option<Vec<Box<dyn age::Identity + Send + Sync>>>,
    consume: F,
) -> Result<(T, u64), LoadError>
where
    F: FnOnce(&mut dyn Read) -> io::Result<T>,
{
    let source = ChannelReader {
        rx,
        current: Bytes::new(),
        tally,
    };
    let buffered = BufReader::with_capacity(64 * 1024, source);
    let plain: Box<dyn Read> = match identities {
        None => Box::new(buffered),
        Some(ids) => {
            let decryptor = age::Decryptor::new_buffered(buffered)
                .map_err(|e| LoadError::Decode(format!("not a readable age file: {e}")))?;
            let reader = decryptor
                .decrypt(ids.iter().map(|i| i.as_ref() as &dyn age::Identity))
                .map_err(|e| LoadError::Decode(format!("decrypting: {e}")))?;
            Box::new(reader)
        }
    };
    let zstd = zstd::stream::read::Decoder::new(Marked(plain))
        .map_err(|e| LoadError::Decode(format!("decompressing: {e}")))?;
    let mut reader = Marked(Counting {
        inner: zstd,
        bytes: 0,
    });
    let value = consume(&mut reader).map_err(classify)?;
    // Read what the consumer left, so every check covers the whole object.
    io::copy(&mut reader, &mut io::sink()).map_err(classify)?;
    Ok((value, reader.0.bytes))
}

fn classify(e: io::Error) -> LoadError {
    if e.get_ref().is_some_and(|inner| inner.is::<DecodeFailure>()) {
        LoadError::Decode(e.to_string())
    } else {
        LoadError::Consume(e)
    }
}

/// Tags the errors of the reader it wraps as [`DecodeFailure`]s.
struct Marked<R>(R);

impl<R: Read> Read for Marked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            if e.get_ref().is_some_and(|inner| inner.is::<DecodeFailure>()) {
                e
            } else {
                io::Error::new(e.kind(), DecodeFailure(e.to_string()))
            }
        })
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The object's bytes as a `Read`, hashed and counted as they pass.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
    tally: Arc<Mutex<(Sha256, u64)>>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            let Some(chunk) = self.rx.blocking_recv() else {
                return Ok(0);
            };
            let mut tally = self.tally.lock().expect("tally lock");
            tally.0.update(&chunk);
            tally.1 += chunk.len() as u64;
            self.current = chunk;
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}
