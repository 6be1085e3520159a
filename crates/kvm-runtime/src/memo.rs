//! What a long-lived reader (the server's worker) remembers between calls:
//! small process-wide maps, forgotten all at once when they grow past
//! [`MAX_REMEMBERED`] (a node runs far fewer instances).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

/// How many entries one memory keeps.
pub(crate) const MAX_REMEMBERED: usize = 4096;

/// A process-wide map, usable as a `static`.
pub(crate) struct Memo<K, V> {
    map: OnceLock<Mutex<HashMap<K, V>>>,
}

impl<K: Eq + Hash, V> Memo<K, V> {
    /// An empty memory.
    pub(crate) const fn new() -> Self {
        Memo {
            map: OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, V>> {
        // A panic while it was held leaves a whole map: entries are
        // inserted or not.
        self.map
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What `f` makes of the entry for `key`, if there is one.
    pub(crate) fn find<Q, R>(&self, key: &Q, f: impl FnOnce(&V) -> Option<R>) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.lock().get(key).and_then(f)
    }

    /// Remembers `value` for `key`.
    pub(crate) fn put(&self, key: K, value: V) {
        let mut map = self.lock();
        if map.len() >= MAX_REMEMBERED {
            map.clear();
        }
        map.insert(key, value);
    }
}
