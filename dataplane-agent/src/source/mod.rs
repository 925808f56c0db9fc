//! Where the agent learns the cluster's objects from.
pub mod kube;
pub mod manifests;
pub mod objects;

use std::{collections::BTreeSet, path::PathBuf, sync::Mutex};

use crate::source::objects::Delta;

/// What the sources observed since the agent last looked. Sources add to it from their own
/// threads and tasks; the agent takes everything at once, so changes that arrive while it
/// syncs are coalesced into the next sync.
#[derive(Default)]
pub struct Inbox {
    pending: Mutex<Pending>,
    wake: tokio::sync::Notify,
}

#[derive(Debug, Default)]
pub struct Pending {
    /// Manifest paths the watcher reported (files or directories).
    pub paths: BTreeSet<PathBuf>,
    /// Changes to objects, in order (the API server's watches).
    pub deltas: Vec<Delta>,
    /// Events were lost: read everything again.
    pub rescan: bool,
}

impl Inbox {
    pub fn push(&self, add: impl FnOnce(&mut Pending)) {
        add(&mut self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        self.wake.notify_one();
    }

    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Returns once something was pushed since the last wake-up (at once if it already was).
    pub async fn changed(&self) {
        self.wake.notified().await
    }
}
