//! Log lines leave the serving threads through a bounded channel to one writer thread, which
//! writes them to stderr in batches every few milliseconds: a slow or blocked stderr (a full pipe, a stalled log
//! collector) never holds up a request, and a burst of request records costs one write per
//! batch rather than one per line. When the writer falls behind by more than the channel holds,
//! lines are dropped and counted, and the writer says how many in the log itself.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

/// Lines waiting for the writer at most (about 4 MiB of request records).
const CAPACITY: usize = 8192;
/// Bytes gathered before a write, at most.
const BATCH: usize = 64 << 10;
/// How often a busy writer collects lines (a line waits at most about this long).
const TICK: Duration = Duration::from_millis(10);

/// Lines dropped because the writer was behind, since the last report.
static DROPPED: AtomicU64 = AtomicU64::new(0);

enum Msg {
    Line(Vec<u8>),
    /// Write out everything before this, then answer.
    Flush(mpsc::Sender<()>),
}

/// The `MakeWriter` for tracing's formatter: each event becomes one line sent to the writer
/// (straight to stderr when there is no writer thread).
#[derive(Clone)]
pub struct LogSink {
    tx: Option<SyncSender<Msg>>,
}

/// Writes out what is still queued when dropped (at the end of `main`).
pub struct LogGuard {
    tx: SyncSender<Msg>,
}

/// Start the writer thread; without one (the thread could not start), lines go straight to
/// stderr.
pub fn start() -> (LogSink, Option<LogGuard>) {
    let (tx, rx) = mpsc::sync_channel(CAPACITY);
    let spawned =
        std::thread::Builder::new().name("llmproxy-log".into()).spawn(move || write_out(&rx, io::stderr()));
    match spawned {
        Ok(_) => (LogSink { tx: Some(tx.clone()) }, Some(LogGuard { tx })),
        Err(_) => (LogSink { tx: None }, None),
    }
}

fn write_out(rx: &Receiver<Msg>, sink: impl Write) {
    let mut out = io::BufWriter::with_capacity(BATCH, sink);
    let mut busy = false;
    loop {
        // While lines keep coming, collect them on a clock: a sender then never has to wake
        // this thread (a futex call and a context switch per line). After a quiet spell, block
        // until the next line.
        let first = if busy {
            std::thread::sleep(TICK);
            match rx.try_recv() {
                Ok(msg) => msg,
                Err(mpsc::TryRecvError::Empty) => {
                    busy = false;
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(msg) => msg,
                Err(_) => return,
            }
        };
        busy = true;
        let mut next = Some(first);
        let mut acks = Vec::new();
        let mut taken = 0;
        while let Some(msg) = next {
            taken += 1;
            match msg {
                Msg::Line(line) => {
                    let _ = out.write_all(&line);
                }
                Msg::Flush(ack) => acks.push(ack),
            }
            // BufWriter writes whenever BATCH bytes have gathered; at most one channel's worth a round.
            next = if taken < CAPACITY { rx.try_recv().ok() } else { None };
        }
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "{{\"level\":\"WARN\",\"target\":\"llmproxy::log\",\"message\":\"{dropped} log lines dropped: the log writer fell behind\"}}"
            );
        }
        let _ = out.flush();
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

/// One event's line, sent when tracing is done writing it.
pub struct Line<'a> {
    buf: Vec<u8>,
    tx: Option<&'a SyncSender<Msg>>,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        let line = std::mem::take(&mut self.buf);
        let Some(tx) = self.tx else {
            let _ = io::stderr().write_all(&line);
            return;
        };
        match tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
            // The writer is gone (it cannot be, short of a panic in it): write it here.
            Err(TrySendError::Disconnected(Msg::Line(line))) => {
                let _ = io::stderr().write_all(&line);
            }
            Err(TrySendError::Disconnected(Msg::Flush(_))) => {}
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line { buf: Vec::with_capacity(256), tx: self.tx.as_ref() }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let (ack, done) = mpsc::channel();
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_and_a_flush_waits_for_them() {
        let (tx, rx) = mpsc::sync_channel(CAPACITY);
        let out = Shared::default();
        let sink = out.clone();
        let writer = std::thread::spawn(move || write_out(&rx, sink));
        let logs = LogSink { tx: Some(tx.clone()) };
        for i in 0..1000 {
            let mut line = tracing_subscriber::fmt::MakeWriter::make_writer(&logs);
            let _ = write!(line, "line {i}");
            let _ = writeln!(line, " end");
        }
        drop(LogGuard { tx });
        let text = String::from_utf8(out.0.lock().map(|b| b.clone()).unwrap_or_default()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert!(lines.iter().enumerate().all(|(i, l)| *l == format!("line {i} end")));
        drop(logs);
        let _ = writer.join();
    }
}
