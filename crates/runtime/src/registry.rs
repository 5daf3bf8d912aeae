//! Which handler takes which event type, and which handlers are switched off (`DISABLED_HANDLERS`).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::Handler;

#[derive(Clone, Default)]
pub struct Registry {
    handlers: Vec<Arc<dyn Handler>>,
    disabled: BTreeSet<String>,
}

/// Where an event type goes.
#[derive(Clone)]
pub enum Route {
    Handler(Arc<dyn Handler>),
    /// A handler exists but is disabled: the mount must keep the input, never drop it.
    Disabled(&'static str),
    /// No handler for this type: skipped, counted, acknowledged.
    Unhandled,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DISABLED_HANDLERS names unknown handler `{name}`; known handlers: {known}")]
pub struct UnknownHandler {
    pub name: String,
    pub known: String,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a handler. A later handler for an already-routed event type does not take it over.
    pub fn with(mut self, handler: impl Handler + 'static) -> Self {
        self.handlers.push(Arc::new(handler));
        self
    }

    /// Disables handlers by name; an unknown name is an error (a typo must not silently keep a handler on).
    pub fn disable<S: AsRef<str>>(&mut self, names: &[S]) -> Result<(), UnknownHandler> {
        for name in names {
            let name = name.as_ref().trim();
            if name.is_empty() {
                continue;
            }
            if !self.handlers.iter().any(|h| h.name() == name) {
                return Err(UnknownHandler {
                    name: name.to_owned(),
                    known: self.names().join(", "),
                });
            }
            self.disabled.insert(name.to_owned());
        }
        Ok(())
    }

    pub fn route(&self, event_type: &str) -> Route {
        match self
            .handlers
            .iter()
            .find(|h| h.event_types().contains(&event_type))
        {
            Some(h) if self.disabled.contains(h.name()) => Route::Disabled(h.name()),
            Some(h) => Route::Handler(h.clone()),
            None => Route::Unhandled,
        }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.handlers.iter().map(|h| h.name()).collect()
    }

    pub fn enabled(&self) -> Vec<&'static str> {
        self.names()
            .into_iter()
            .filter(|n| !self.disabled.contains(*n))
            .collect()
    }

    pub fn disabled(&self) -> Vec<&'static str> {
        self.names()
            .into_iter()
            .filter(|n| self.disabled.contains(*n))
            .collect()
    }

    /// Event types with an enabled handler.
    pub fn enabled_event_types(&self) -> Vec<&'static str> {
        self.handlers
            .iter()
            .filter(|h| !self.disabled.contains(h.name()))
            .flat_map(|h| h.event_types().iter().copied())
            .collect()
    }
}
