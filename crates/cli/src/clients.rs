//! Clients built from the settings, shared by the processes and the commands (a leaf: it imports no other module
//! of this crate).

use anyhow::Context as _;
use aura_celery::{Broker, ResultBackend};
use aura_runtime::Settings;

/// `BROKER_URL` as a kombu Redis broker.
pub fn celery_broker(settings: &Settings) -> anyhow::Result<Broker> {
    let url = &settings.celery.broker_url;
    Broker::open(
        url.expose(),
        url.redacted(),
        settings.celery.visibility_timeout,
    )
    .with_context(|| format!("BROKER_URL={url}"))
}

/// `RESULT_BACKEND` as Celery's Redis result backend.
pub fn result_backend(settings: &Settings) -> anyhow::Result<ResultBackend> {
    let url = &settings.celery.result_backend;
    ResultBackend::open(url.expose(), url.redacted(), settings.celery.result_expires)
        .with_context(|| format!("RESULT_BACKEND={url}"))
}
