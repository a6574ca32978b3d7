//! [`Coalescing`]: single-job pushes from many concurrent callers sent to the broker as batches.
//!
//! An API under load receives thousands of `POST /v1/jobs` a second, each carrying one job. A
//! broker round trip per job makes the broker pay its per-call cost (a Lua script invocation on
//! Redis, a publisher confirm on RabbitMQ, a commit on SQLite) once per job. Here a push joins
//! whatever other pushes are waiting and the group goes out as one [`Producer::push_batch`]
//! (group commit): nothing waits on a timer, so a lone request goes out at once, and under load
//! the batches grow by themselves to what arrived during the previous round trip.
//!
//! Every caller still gets its own answer only once the broker has the job. A failed batch
//! fails each of its pushes with the batch's error (503 at the API): as with a single push that
//! times out, the broker may have stored some of them, which an idempotency key makes safe to
//! retry.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

use super::{
    BrokerError, CancelOutcome, ConsumerConfig, DeadOutcome, Driver, Enqueued, Producer, QueueStats,
};
use crate::{Job, JobId, JobRecord, QueueName};

/// Most jobs in one coalesced batch.
const MAX_BATCH: usize = 512;
/// Batches in flight at once. More than one keeps the broker connection busy while a batch is
/// on the wire; few enough that waiting pushes gather into large batches under load.
const MAX_IN_FLIGHT: usize = 4;

struct Waiting {
    job: Job,
    reply: oneshot::Sender<Result<Enqueued, BrokerError>>,
}

/// A [`Producer`] whose [`push`](Producer::push) coalesces concurrent calls; every other call
/// goes straight to the wrapped producer.
pub struct Coalescing {
    inner: Arc<dyn Producer>,
    tx: mpsc::UnboundedSender<Waiting>,
    /// Every batch this producer sends is one `enqueue` round trip.
    rtt: metrics::Histogram,
}

impl Coalescing {
    /// Wraps `inner`. Spawns the batching task on the current tokio runtime; it ends when the
    /// last handle is dropped, after answering every push it received.
    pub fn new(inner: Arc<dyn Producer>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let rtt = crate::metrics::broker_request_duration(crate::metrics::operation::ENQUEUE);
        tokio::spawn(gather(inner.clone(), rx, rtt.clone()));
        Self { inner, tx, rtt }
    }
}

async fn gather(inner: Arc<dyn Producer>, mut rx: mpsc::UnboundedReceiver<Waiting>, rtt: metrics::Histogram) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut waiting = Vec::with_capacity(MAX_BATCH);
    loop {
        // Take a slot before gathering: while every slot is busy, pushes keep arriving and the
        // next batch grows.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        if rx.recv_many(&mut waiting, MAX_BATCH).await == 0 {
            return;
        }
        let batch = std::mem::replace(&mut waiting, Vec::with_capacity(MAX_BATCH));
        let inner = inner.clone();
        let rtt = rtt.clone();
        let span = tracing::debug_span!("push_coalesced", jobs = batch.len());
        tokio::spawn(
            async move {
                let started = std::time::Instant::now();
                send(&*inner, batch).await;
                rtt.record(started.elapsed().as_secs_f64());
                drop(slot);
            }
            .instrument(span),
        );
    }
}

async fn send(inner: &dyn Producer, batch: Vec<Waiting>) {
    let (jobs, replies): (Vec<Job>, Vec<_>) = batch.into_iter().map(|w| (w.job, w.reply)).unzip();
    match inner.push_batch(jobs).await {
        Ok(results) if results.len() == replies.len() => {
            for (reply, result) in replies.into_iter().zip(results) {
                // The caller may have gone (request canceled); the job is stored either way.
                let _ = reply.send(Ok(result));
            }
        }
        Ok(results) => {
            let error = BrokerError::Corrupt(format!(
                "the broker answered {} results for a batch of {}",
                results.len(),
                replies.len()
            ));
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

#[async_trait]
impl Producer for Coalescing {
    async fn push(&self, job: Job) -> Result<Enqueued, BrokerError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Waiting { job, reply })
            .map_err(|_| BrokerError::Other("the enqueue batcher has stopped".into()))?;
        answer
            .await
            .map_err(|_| BrokerError::Other("the enqueue batch was abandoned".into()))?
    }

    async fn push_batch(&self, jobs: Vec<Job>) -> Result<Vec<Enqueued>, BrokerError> {
        let started = std::time::Instant::now();
        let result = self.inner.push_batch(jobs).await;
        self.rtt.record(started.elapsed().as_secs_f64());
        result
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, BrokerError> {
        self.inner.get(id).await
    }

    async fn cancel(&self, id: JobId) -> Result<CancelOutcome, BrokerError> {
        self.inner.cancel(id).await
    }

    async fn stats(&self, queue: &QueueName) -> Result<QueueStats, BrokerError> {
        self.inner.stats(queue).await
    }

    async fn queues(&self) -> Result<Vec<QueueName>, BrokerError> {
        self.inner.queues().await
    }

    async fn dead(&self, queue: &QueueName, offset: u64, limit: u64) -> Result<Vec<JobRecord>, BrokerError> {
        self.inner.dead(queue, offset, limit).await
    }

    async fn retry_dead(&self, id: JobId) -> Result<DeadOutcome, BrokerError> {
        self.inner.retry_dead(id).await
    }

    async fn retry_all_dead(&self, queue: &QueueName) -> Result<u64, BrokerError> {
        self.inner.retry_all_dead(queue).await
    }

    async fn discard_dead(&self, id: JobId) -> Result<DeadOutcome, BrokerError> {
        self.inner.discard_dead(id).await
    }

    async fn discard_all_dead(&self, queue: &QueueName) -> Result<u64, BrokerError> {
        self.inner.discard_all_dead(queue).await
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.inner.ping().await
    }

    async fn driver(&self, queue: &QueueName, cfg: &ConsumerConfig) -> Result<Arc<dyn Driver>, BrokerError> {
        self.inner.driver(queue, cfg).await
    }

    fn depth_source(&self, queue: &QueueName) -> String {
        self.inner.depth_source(queue)
    }

    async fn destroy(&self) -> Result<(), BrokerError> {
        self.inner.destroy().await
    }
}
