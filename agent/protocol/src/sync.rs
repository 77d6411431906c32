//! One policy for a poisoned `std::sync::Mutex`, in every Shoal crate: recover the guard.
//!
//! A mutex is poisoned when a thread panicked while holding it. Every critical section in
//! Shoal is short and synchronous (a map insert, a cache `put`, a counter update), so the
//! data behind a poisoned lock is what one of those steps left: consistent, at worst missing
//! the one update that panicked. Refusing it (`lock().expect(..)`) would turn one panicking
//! task into a panic in every later task that touches the same state, i.e. a dead agent
//! that still holds its ports. So [`lock`] takes the guard back, clears the poison (so the
//! warning is logged once per panic, not once per lock) and goes on.
//!
//! Async locks (`tokio::sync::Mutex`) are not poisoned and need no helper.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, recovering it if a panic poisoned it (see the module docs).
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => {
            tracing::warn!("a task panicked while holding a lock; going on with its data");
            mutex.clear_poison();
            poisoned.into_inner()
        }
    }
}

/// `text` cut to at most `max_bytes`, at a character boundary (`String::truncate` panics
/// when the cut falls inside a multi-byte character).
pub fn clip(mut text: String, max_bytes: usize) -> String {
    if text.len() > max_bytes {
        let mut end = max_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_recovered_once() {
        let m = std::sync::Arc::new(Mutex::new(vec![1]));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            g.push(2);
            panic!("boom");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), vec![1, 2]);
        assert!(!m.is_poisoned(), "the poison is cleared once recovered");
        lock(&m).push(3);
        assert_eq!(*lock(&m), vec![1, 2, 3]);
    }

    #[test]
    fn clip_cuts_at_a_char_boundary() {
        // Byte 200 falls inside the 2-byte 'é' at 199..201.
        let text = format!("{}é and more", "x".repeat(199));
        assert!(!text.is_char_boundary(200));
        let clipped = clip(text.clone(), 200);
        assert_eq!(clipped, "x".repeat(199));
        // 4-byte characters, every cut position.
        let crabs = "🦀".repeat(10);
        for max in 0..=crabs.len() + 1 {
            let c = clip(crabs.clone(), max);
            assert!(c.len() <= max && crabs.starts_with(&c) && c.len().is_multiple_of(4), "max {max}: {c:?}");
        }
        assert_eq!(clip("short".into(), 200), "short");
    }
}
