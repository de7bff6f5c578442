//! Which URLs get the most requests, approximately: a Space-Saving sketch
//! (Metwally et al.) of a few dozen entries, fed by one request in
//! [`SAMPLE_EVERY`] per thread so the request path pays a thread-local
//! increment, not a lock. The console reads it; nothing decides anything
//! by it.
//!
//! Must not keep more than [`CAPACITY`] URLs, or query strings (they may
//! carry secrets and make every URL distinct).

use std::cell::Cell;
use std::sync::OnceLock;

use parking_lot::Mutex;

/// URLs tracked at once; a new one replaces the least counted.
const CAPACITY: usize = 64;

/// One request in this many is counted (with this weight).
const SAMPLE_EVERY: u64 = 8;

/// The longest URL kept; longer ones are cut (a client may send 8 KiB).
const MAX_URL: usize = 200;

#[derive(Default)]
struct Sketch {
    /// (host + path, estimated count, overestimate bound)
    entries: Vec<(String, u64, u64)>,
}

fn sketch() -> &'static Mutex<Sketch> {
    static SKETCH: OnceLock<Mutex<Sketch>> = OnceLock::new();
    SKETCH.get_or_init(Mutex::default)
}

thread_local! {
    static SEEN: Cell<u64> = const { Cell::new(0) };
}

/// Counts a request for `host` + `path` (sampled).
pub fn record(host: &str, path: &str) {
    let sampled = SEEN.with(|seen| {
        let next = seen.get().wrapping_add(1);
        seen.set(next);
        next % SAMPLE_EVERY == 0
    });
    if !sampled {
        return;
    }
    let mut url = String::with_capacity(host.len() + path.len());
    url.push_str(host);
    url.push_str(path);
    if url.len() > MAX_URL {
        let mut cut = MAX_URL;
        while !url.is_char_boundary(cut) {
            cut -= 1;
        }
        url.truncate(cut);
    }
    sketch().lock().add(url, SAMPLE_EVERY);
}

impl Sketch {
    fn add(&mut self, url: String, weight: u64) {
        if let Some(entry) = self.entries.iter_mut().find(|entry| entry.0 == url) {
            entry.1 += weight;
            return;
        }
        if self.entries.len() < CAPACITY {
            self.entries.push((url, weight, 0));
            return;
        }
        // Space-Saving: the least counted entry gives its place, and its
        // count becomes the newcomer's possible overestimate.
        if let Some(least) = self.entries.iter_mut().min_by_key(|entry| entry.1) {
            let floor = least.1;
            *least = (url, floor + weight, floor);
        }
    }

    fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut top: Vec<(String, u64)> = self
            .entries
            .iter()
            .map(|(url, count, _)| (url.clone(), *count))
            .collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(n);
        top
    }
}

/// The `n` most requested URLs (host + path) with their estimated request
/// counts since start, most first.
pub fn top(n: usize) -> Vec<(String, u64)> {
    sketch().lock().top(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heavy_urls_stay_on_top_of_a_long_tail() {
        let mut sketch = Sketch::default();
        for i in 0..10_000u64 {
            sketch.add(format!("h/tail/{i}"), 1);
            if i % 4 == 0 {
                sketch.add("h/hot".to_string(), 1);
            }
            if i % 10 == 0 {
                sketch.add("h/warm".to_string(), 1);
            }
        }
        let top = sketch.top(2);
        assert_eq!(top[0].0, "h/hot");
        assert_eq!(top[1].0, "h/warm");
        assert!(top[0].1 >= 2_500, "{top:?}");
        assert_eq!(sketch.entries.len(), CAPACITY);
    }
}
