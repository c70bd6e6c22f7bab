//! Time as the service sees it. Workers read "now" from a [`Clock`] so tests
//! can move time forward to check backoff, leases and timeouts without sleeping.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};

#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<Mutex<DateTime<Utc>>>>,
}

impl Clock {
    pub fn system() -> Self {
        Clock { manual: None }
    }

    /// A clock that stands still until [`Clock::advance`] moves it.
    pub fn manual(start: DateTime<Utc>) -> Self {
        Clock {
            manual: Some(Arc::new(Mutex::new(start))),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            Some(time) => *time.lock().expect("clock mutex"),
            None => Utc::now(),
        }
    }

    /// Moves a manual clock forward. Panics on the system clock: a test bug.
    pub fn advance(&self, by: Duration) {
        let time = self
            .manual
            .as_ref()
            .expect("only a manual clock can be advanced");
        *time.lock().expect("clock mutex") += by;
    }
}
