//! The threads media runs on: each is one OS thread with a single-threaded tokio runtime and
//! one media loop (`media_loop`: its socket, its peer connections, their fan-outs), and each
//! room lives on one of them with everything it owns (its participants' tasks, their
//! connections, its fan-outs). A packet then crosses no thread, task or lock on its way
//! through the server. Rooms are spread over the threads, the emptiest first, so several
//! rooms use several cores.

use crate::media_loop::LoopHandle;
use crate::transport::{PeerFactory, TransportError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// One media thread: where to spawn onto it, and how many rooms it carries.
pub(crate) struct MediaThread {
    handle: Handle,
    rooms: AtomicUsize,
    /// Started with the thread's first connection: that is when its port is bound.
    media_loop: Mutex<Option<LoopHandle>>,
}

impl MediaThread {
    /// Spawns `future` onto this thread.
    pub(crate) fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }

    /// The thread's media loop, started (its sockets bound) on first use. A failed start is
    /// not remembered: the next connection tries again.
    pub(crate) fn media_loop(
        &self,
        factory: &Arc<PeerFactory>,
    ) -> Result<LoopHandle, TransportError> {
        let mut media_loop = self.media_loop.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = media_loop.as_ref() {
            return Ok(handle.clone());
        }
        let handle = LoopHandle::start(Arc::clone(factory), |future| {
            self.handle.spawn(future);
        })?;
        *media_loop = Some(handle.clone());
        Ok(handle)
    }
}

/// A room's claim on its media thread; the thread counts one room fewer when it is dropped.
pub(crate) struct RoomPlacement {
    thread: Arc<MediaThread>,
}

impl RoomPlacement {
    pub(crate) fn thread(&self) -> &Arc<MediaThread> {
        &self.thread
    }
}

impl Drop for RoomPlacement {
    fn drop(&mut self) {
        self.thread.rooms.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The media threads of one [`crate::Sfu`]; they stop when it is dropped.
pub(crate) struct MediaThreads {
    threads: Vec<Arc<MediaThread>>,
    /// Dropping these ends each thread's runtime (and whatever still runs on it).
    _stop: Vec<oneshot::Sender<()>>,
}

impl MediaThreads {
    /// Starts `count` media threads. With `0`, media runs on the runtime that calls this
    /// (tokio's multi-threaded scheduler, if that is what the caller uses).
    pub(crate) fn start(count: usize) -> std::io::Result<Self> {
        if count == 0 {
            let handle = Handle::try_current().map_err(|_| {
                std::io::Error::other("media on the caller's runtime, but there is none")
            })?;
            return Ok(Self {
                threads: vec![Arc::new(MediaThread {
                    handle,
                    rooms: AtomicUsize::new(0),
                    media_loop: Mutex::new(None),
                })],
                _stop: Vec::new(),
            });
        }
        let mut threads = Vec::with_capacity(count);
        let mut stop = Vec::with_capacity(count);
        for index in 0..count {
            let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("sfu-media-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    // Runs until the SFU is dropped; the runtime then drops its tasks.
                    let _ = runtime.block_on(stop_rx);
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| std::io::Error::other("a media thread ended while starting"))??;
            threads.push(Arc::new(MediaThread {
                handle,
                rooms: AtomicUsize::new(0),
                media_loop: Mutex::new(None),
            }));
            stop.push(stop_tx);
        }
        Ok(Self {
            threads,
            _stop: stop,
        })
    }

    /// Picks the thread carrying the fewest rooms for a new room.
    pub(crate) fn place_room(&self) -> RoomPlacement {
        let thread = self
            .threads
            .iter()
            .min_by_key(|t| t.rooms.load(Ordering::Relaxed))
            .expect("at least one media thread");
        thread.rooms.fetch_add(1, Ordering::Relaxed);
        RoomPlacement {
            thread: Arc::clone(thread),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rooms_go_to_the_emptiest_thread_and_leave_it_when_dropped() {
        let threads = MediaThreads::start(2).unwrap();
        let first = threads.place_room();
        let second = threads.place_room();
        assert!(!Arc::ptr_eq(first.thread(), second.thread()));
        let first_thread = Arc::clone(first.thread());
        drop(first);
        let third = threads.place_room();
        assert!(Arc::ptr_eq(third.thread(), &first_thread));
    }

    #[tokio::test]
    async fn a_room_runs_on_its_own_media_thread() {
        let threads = MediaThreads::start(2).unwrap();
        let placement = threads.place_room();
        let name = placement
            .thread()
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert!(
            name.as_deref().is_some_and(|n| n.starts_with("sfu-media-")),
            "{name:?}"
        );
    }

    #[test]
    fn zero_threads_outside_a_runtime_is_an_error_not_a_panic() {
        assert!(MediaThreads::start(0).is_err());
    }

    #[tokio::test]
    async fn zero_threads_means_the_callers_runtime() {
        let threads = MediaThreads::start(0).unwrap();
        let placement = threads.place_room();
        let caller = std::thread::current().id();
        let ran_on = placement
            .thread()
            .spawn(async { std::thread::current().id() })
            .await
            .unwrap();
        // A current-thread test runtime runs spawned tasks on the calling thread.
        assert_eq!(ran_on, caller);
    }
}
