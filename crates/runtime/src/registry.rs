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

    /// Every registered handler, enabled or not.
    pub fn handlers(&self) -> impl Iterator<Item = &dyn Handler> {
        self.handlers.iter().map(|h| h.as_ref())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HandlerContext, HandlerError};
    use async_trait::async_trait;
    use aura_events::Event;

    struct Named(&'static str, &'static [&'static str]);

    #[async_trait]
    impl Handler for Named {
        fn name(&self) -> &'static str {
            self.0
        }
        fn event_types(&self) -> &'static [&'static str] {
            self.1
        }
        async fn handle(&self, _: &Event, _: &HandlerContext) -> Result<Vec<Event>, HandlerError> {
            Ok(Vec::new())
        }
    }

    fn registry() -> Registry {
        Registry::new()
            .with(Named(
                "moods",
                &["user.mood.created", "user.activity.created"],
            ))
            .with(Named("ingest", &["context.vectorized"]))
    }

    #[test]
    fn disabled_handlers_route_as_disabled_and_leave_the_enabled_types() {
        let mut registry = registry();
        registry.disable(&["ingest", " "]).unwrap();
        assert!(
            matches!(registry.route("user.activity.created"), Route::Handler(h) if h.name() == "moods")
        );
        assert!(matches!(
            registry.route("context.vectorized"),
            Route::Disabled("ingest")
        ));
        assert!(matches!(registry.route("billing.paid"), Route::Unhandled));
        assert_eq!(registry.enabled(), ["moods"]);
        assert_eq!(registry.disabled(), ["ingest"]);
        assert_eq!(
            registry.enabled_event_types(),
            ["user.mood.created", "user.activity.created"]
        );
    }

    #[test]
    fn disabling_an_unknown_handler_is_an_error_listing_the_known_ones() {
        let err = registry().disable(&["ingets"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "DISABLED_HANDLERS names unknown handler `ingets`; known handlers: moods, ingest"
        );
    }
}
