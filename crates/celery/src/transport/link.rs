//! The reconnecting link to one Redis server/database: retries on a new connection with backoff, bounded by a
//! [`Patience`].

use super::*;

/// One Redis server/database, reconnected on demand: a command that fails on a dropped connection is retried on a
/// new one with backoff, so a Redis restart or `CLIENT KILL` costs a pause, not the worker (Celery #8030).
pub struct RedisLink {
    pub(super) client: Client,
    pub(super) db: i64,
    pub(super) url: String,
    pub(super) config: AsyncConnectionConfig,
    pub(super) cached: Mutex<Option<MultiplexedConnection>>,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink").field("url", &self.url).finish()
    }
}

/// How long a command may keep failing before the caller gets the error.
#[derive(Clone, Copy, Debug)]
pub enum Patience {
    /// Retry until it succeeds (acknowledgements, results: giving up would redeliver, not lose, but why).
    Forever,
    Until(Duration),
}

impl RedisLink {
    /// `redis://[:password@]host[:port][/db]`, `rediss://…` (TLS), `unix:///path?db=N`. `redacted` is what logs show.
    pub fn open(
        url: &str,
        redacted: String,
        response_timeout: Option<Duration>,
    ) -> Result<Self, TransportError> {
        let client = Client::open(url).map_err(|e| TransportError::BadUrl {
            url: redacted.clone(),
            reason: e.to_string(),
        })?;
        let db = client.get_connection_info().redis_settings().db();
        Ok(Self {
            client,
            db,
            url: redacted,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(response_timeout),
            cached: Mutex::new(None),
        })
    }

    pub fn db(&self) -> i64 {
        self.db
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub(super) async fn connection(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut cached = self.cached.lock().await;
        if let Some(conn) = cached.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        *cached = Some(conn.clone());
        Ok(conn)
    }

    pub(super) async fn forget(&self) {
        *self.cached.lock().await = None;
    }

    /// Runs `op` on a connection, reconnecting and retrying on connection-level failures.
    pub async fn run<T, F, Fut>(
        &self,
        what: &'static str,
        patience: Patience,
        op: F,
    ) -> Result<T, TransportError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let started = tokio::time::Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = match self.connection().await {
                Ok(conn) => op(conn).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(value) => {
                    if attempt > 1 {
                        tracing::info!(redis = %self.url, what, attempt, "Redis is back");
                    }
                    return Ok(value);
                }
                Err(error) if !is_retryable(&error) => {
                    return Err(TransportError::Redis {
                        what,
                        source: error,
                    });
                }
                Err(error) => {
                    self.forget().await;
                    let delay = backoff(attempt);
                    let out_of_time = match patience {
                        Patience::Forever => false,
                        Patience::Until(limit) => started.elapsed() + delay > limit,
                    };
                    if out_of_time {
                        return Err(TransportError::GaveUp {
                            what,
                            attempts: attempt,
                            last: error.to_string(),
                        });
                    }
                    tracing::warn!(redis = %self.url, what, attempt, retry_in_ms = delay.as_millis() as u64,
                        %error, "Redis unavailable; reconnecting");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Runs a pipeline (`MULTI`/`EXEC` if it was built `atomic()`).
    pub async fn pipe<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        patience: Patience,
        pipe: &Pipeline,
    ) -> Result<T, TransportError> {
        self.run(what, patience, |mut conn| async move {
            pipe.query_async(&mut conn).await
        })
        .await
    }

    /// Runs one command.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        patience: Patience,
        cmd: &redis::Cmd,
    ) -> Result<T, TransportError> {
        self.run(what, patience, |mut conn| async move {
            cmd.query_async(&mut conn).await
        })
        .await
    }

    /// Runs a script (`EVALSHA`, loading it on `NOSCRIPT`).
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        patience: Patience,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, TransportError> {
        self.run(what, patience, |mut conn| async move {
            invocation.invoke_async(&mut conn).await
        })
        .await
    }
}

/// Connection-level trouble (dropped, refused, timed out, server loading or read-only after a failover) is worth a
/// retry on a new connection; anything else (a wrong type, a script error) is not.
pub(super) fn is_retryable(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                | redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                | redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
                | redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown)
        )
}

pub(super) fn backoff(attempt: u32) -> Duration {
    let ms = 100u64
        .saturating_mul(1 << attempt.min(7).saturating_sub(1))
        .min(5_000);
    Duration::from_millis(ms)
}
