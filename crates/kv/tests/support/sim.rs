//! A simulated engine driving the pool and the radix cache, checked against a
//! reference model after every operation. Shared by the proptest suite
//! (`tests/radix_model.rs`) and the cargo-fuzz target (`fuzz/fuzz_targets/ops.rs`),
//! which includes this file by path. Failures panic with a description.
//!
//! The reference model is deliberately naive: a map from every cached page-aligned
//! token prefix to the page holding its last page, with a lock count and a
//! last-access time per entry. It knows nothing of nodes or splits.

#![allow(dead_code)] // each including crate uses a different subset

use std::collections::{BTreeMap, HashMap};

use radix_kv::{KvError, NodeId, PageId, PagePool, PageState, RadixCache};

/// How a prompt is made: a prefix of one of a few fixed base sequences, then a tail
/// over a tiny alphabet (so prompts collide inside pages and force splits).
#[derive(Debug, Clone, Copy)]
pub struct Prompt {
    pub base: u8,
    pub shared: u8,
    pub tail_len: u8,
    pub tail_seed: u32,
}

/// Which invalid call to make.
#[derive(Debug, Clone, Copy)]
pub enum BadCall {
    /// Release a page that is free.
    ReleaseFree,
    /// Release a page the tree holds.
    ReleaseCached,
    /// Release one of a request's own pages twice in one call.
    ReleaseTwice,
    /// Release a page id past the pool.
    ReleaseOutOfRange,
    /// Unlock a node whose lock count is zero, or a stale node.
    Unlock(u8),
    /// Insert a request's tokens with one page too many.
    InsertWrongCount,
    /// Insert a request's tokens listing a free page.
    InsertFreePage,
}

/// One operation of the simulated engine. `req` picks a live request modulo their count.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// A new request: match, lock, allocate the rest (evicting if short).
    Admit(Prompt),
    /// A request appends `n` generated tokens (allocating, evicting if short).
    Generate {
        req: u8,
        n: u8,
        seed: u32,
    },
    /// Insert a running request's whole pages and hand its lock over.
    CacheUnfinished {
        req: u8,
    },
    /// Insert, release the unaligned tail, unlock, drop the request.
    Finish {
        req: u8,
    },
    /// Release the request's own pages, unlock, drop it.
    Abort {
        req: u8,
    },
    /// A bare lookup (no lock).
    Match(Prompt),
    /// An extra lock on a request's node, or giving one back.
    ExtraLock {
        req: u8,
    },
    ExtraUnlock {
        req: u8,
    },
    /// Evict at least `n` pages if possible.
    Evict {
        n: u8,
    },
    /// An invalid call: must fail and change nothing.
    Bad(BadCall),
}

struct Request {
    tokens: Vec<u32>,
    /// Pages for all tokens; `pages[..tree_pages]` are the tree's, the rest owned.
    pages: Vec<PageId>,
    tree_pages: usize,
    /// The node locked for `pages[..tree_pages]` (the root when none).
    locked: NodeId,
    extra_locks: u32,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    page: PageId,
    locks: u32,
    last_access: u64,
}

/// The reference model: page-aligned prefix -> the page ending it.
#[derive(Default)]
struct Model {
    entries: HashMap<Vec<u32>, Entry>,
    clock: u64,
}

impl Model {
    /// Longest cached prefix, in pages (the model is prefix-closed).
    fn matched_pages(&self, tokens: &[u32], ps: usize) -> usize {
        (1..=tokens.len() / ps)
            .take_while(|&j| self.entries.contains_key(&tokens[..j * ps]))
            .count()
    }

    fn pages_of(&self, tokens: &[u32], ps: usize, n: usize) -> Vec<PageId> {
        (1..=n).map(|j| self.entries[&tokens[..j * ps]].page).collect()
    }

    fn touch(&mut self, tokens: &[u32], ps: usize, n: usize) {
        self.clock += 1;
        for j in 1..=n {
            self.entries.get_mut(&tokens[..j * ps]).unwrap().last_access = self.clock;
        }
    }

    fn add_locks(&mut self, tokens: &[u32], ps: usize, n: usize, delta: i32) {
        for j in 1..=n {
            let e = self.entries.get_mut(&tokens[..j * ps]).unwrap();
            e.locks = e.locks.checked_add_signed(delta).expect("model lock underflow");
        }
    }

    fn is_leaf(&self, prefix: &[u32]) -> bool {
        !self.entries.keys().any(|k| k.len() > prefix.len() && k.starts_with(prefix))
    }
}

/// The simulated engine plus its reference model.
pub struct Sim {
    pub pool: PagePool,
    pub cache: RadixCache,
    ps: usize,
    requests: Vec<Request>,
    model: Model,
    bases: Vec<Vec<u32>>,
    /// Every node id ever returned, to aim bad unlocks at (live or stale).
    seen_nodes: Vec<NodeId>,
    pub ops_run: usize,
}

const MAX_REQUESTS: usize = 12;
const MAX_TOKENS: usize = 160;

fn lcg(state: &mut u32) -> u32 {
    *state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
    *state >> 16
}

impl Sim {
    pub fn new(num_pages: usize, page_size: usize) -> Self {
        let pool = PagePool::new(num_pages, page_size).expect("valid pool");
        let cache = RadixCache::new(&pool);
        let bases = (0..4u32)
            .map(|b| {
                let mut s = b + 1;
                (0..96).map(|_| lcg(&mut s) % 6).collect()
            })
            .collect();
        Self {
            pool,
            cache,
            ps: page_size,
            requests: Vec::new(),
            model: Model::default(),
            bases,
            seen_nodes: Vec::new(),
            ops_run: 0,
        }
    }

    fn prompt_tokens(&self, p: Prompt) -> Vec<u32> {
        let base = &self.bases[p.base as usize % self.bases.len()];
        let mut tokens = base[..p.shared as usize % base.len()].to_vec();
        let mut s = p.tail_seed;
        tokens.extend((0..p.tail_len % 40).map(|_| lcg(&mut s) % 3));
        if tokens.is_empty() {
            tokens.push(0);
        }
        tokens
    }

    pub fn run(&mut self, op: Op) {
        match op {
            Op::Admit(p) => self.admit(p),
            Op::Generate { req, n, seed } => self.generate(req, n, seed),
            Op::CacheUnfinished { req } => self.insert_request(req, false),
            Op::Finish { req } => self.insert_request(req, true),
            Op::Abort { req } => self.abort(req),
            Op::Match(p) => {
                let tokens = self.prompt_tokens(p);
                self.checked_match(&tokens);
            }
            Op::ExtraLock { req } => {
                if let Some(i) = self.pick(req) {
                    let r = &mut self.requests[i];
                    self.cache.lock(r.locked).expect("lock of a held node");
                    r.extra_locks += 1;
                    let (tokens, n) = (r.tokens.clone(), r.tree_pages);
                    self.model.add_locks(&tokens, self.ps, n, 1);
                }
            }
            Op::ExtraUnlock { req } => {
                if let Some(i) = self.pick(req) {
                    let r = &mut self.requests[i];
                    if r.extra_locks > 0 {
                        self.cache.unlock(r.locked).expect("unlock of an extra lock");
                        r.extra_locks -= 1;
                        let (tokens, n) = (r.tokens.clone(), r.tree_pages);
                        self.model.add_locks(&tokens, self.ps, n, -1);
                    }
                }
            }
            Op::Evict { n } => self.evict(n as usize),
            Op::Bad(bad) => self.bad_call(bad),
        }
        self.ops_run += 1;
        self.check();
    }

    fn pick(&self, req: u8) -> Option<usize> {
        (!self.requests.is_empty()).then(|| req as usize % self.requests.len())
    }

    /// Matches through the real cache and checks the result against the model.
    fn checked_match(&mut self, tokens: &[u32]) -> (Vec<PageId>, usize, NodeId) {
        let ps = self.ps;
        let found = self.cache.match_prefix(tokens);
        let expected = self.model.matched_pages(tokens, ps);
        assert_eq!(found.matched_tokens, expected * ps, "match length for {tokens:?}");
        assert_eq!(found.pages, self.model.pages_of(tokens, ps, expected), "matched pages");
        assert_eq!(found.last_node.is_root(), expected == 0);
        if expected > 0 {
            self.model.touch(tokens, ps, expected);
        }
        self.seen_nodes.push(found.last_node);
        (found.pages, expected, found.last_node)
    }

    /// Allocates `n` pages, evicting first if the pool is short. None if impossible.
    fn alloc_evicting(&mut self, n: usize) -> Option<Vec<PageId>> {
        let free = self.pool.free_pages();
        if n > free {
            if n - free > self.cache.evictable_pages() {
                return None;
            }
            self.evict(n - free);
        }
        Some(self.pool.alloc(n).expect("enough pages after eviction"))
    }

    fn admit(&mut self, p: Prompt) {
        if self.requests.len() >= MAX_REQUESTS {
            return;
        }
        let tokens = self.prompt_tokens(p);
        let (mut pages, matched, node) = self.checked_match(&tokens);
        self.cache.lock(node).expect("lock of a fresh match");
        self.model.add_locks(&tokens, self.ps, matched, 1);
        let need = tokens.len().div_ceil(self.ps) - matched;
        match self.alloc_evicting(need) {
            Some(own) => {
                pages.extend(own);
                self.requests.push(Request {
                    tokens,
                    pages,
                    tree_pages: matched,
                    locked: node,
                    extra_locks: 0,
                });
            }
            None => {
                self.cache.unlock(node).expect("unlock of a fresh lock");
                self.model.add_locks(&tokens, self.ps, matched, -1);
            }
        }
    }

    fn generate(&mut self, req: u8, n: u8, seed: u32) {
        let Some(i) = self.pick(req) else { return };
        let len = self.requests[i].tokens.len();
        let n = (n as usize % 20 + 1).min(MAX_TOKENS.saturating_sub(len));
        let need = (len + n).div_ceil(self.ps) - self.requests[i].pages.len();
        let Some(own) = self.alloc_evicting(need) else { return };
        let r = &mut self.requests[i];
        let mut s = seed;
        r.tokens.extend((0..n).map(|_| lcg(&mut s) % 3));
        r.pages.extend(own);
    }

    /// Inserts the request's whole pages; then either hands its lock over to the new
    /// node (unfinished) or releases its tail and drops it (finished).
    fn insert_request(&mut self, req: u8, finish: bool) {
        let Some(i) = self.pick(req) else { return };
        let ps = self.ps;
        let full = self.requests[i].tokens.len() / ps;
        let tokens = self.requests[i].tokens[..full * ps].to_vec();
        let had = self.model.matched_pages(&tokens, ps);

        let r = &mut self.requests[i];
        let expected_dups = (0..had)
            .filter(|&j| r.pages[j] != self.model.entries[&tokens[..(j + 1) * ps]].page)
            .count();
        let result = self
            .cache
            .insert(&tokens, &mut r.pages[..full], &mut self.pool)
            .expect("insert of a valid request");
        assert_eq!(result.prefix_pages, had, "insert found a different prefix");
        assert_eq!(result.new_pages, full - had);
        assert_eq!(result.released_duplicates, expected_dups);
        assert_eq!(result.last_node.is_root(), full == 0);
        self.seen_nodes.push(result.last_node);

        // Model: the new pages join; the whole path is touched.
        for j in had..full {
            let entry = Entry { page: r.pages[j], locks: 0, last_access: 0 };
            self.model.entries.insert(tokens[..(j + 1) * ps].to_vec(), entry);
        }
        if full > 0 {
            self.model.touch(&tokens, ps, full);
        }
        assert_eq!(r.pages[..full], self.model.pages_of(&tokens, ps, full)[..]);

        let (old_node, old_pages, extra) = (r.locked, r.tree_pages, r.extra_locks);
        if finish {
            let r = self.requests.swap_remove(i);
            self.pool.release(&r.pages[full..]).expect("release of the tail");
            for _ in 0..=extra {
                self.cache.unlock(old_node).expect("unlock at finish");
                self.model.add_locks(&r.tokens, ps, old_pages, -1);
            }
        } else {
            self.cache.lock(result.last_node).expect("lock of the inserted node");
            self.model.add_locks(&tokens, ps, full, 1);
            self.cache.unlock(old_node).expect("unlock of the old node");
            let r = &mut self.requests[i];
            self.model.add_locks(&r.tokens, ps, old_pages, -1);
            for _ in 0..extra {
                self.cache.lock(result.last_node).unwrap();
                self.cache.unlock(old_node).unwrap();
                self.model.add_locks(&tokens, ps, full, 1);
                self.model.add_locks(&r.tokens, ps, old_pages, -1);
            }
            r.tree_pages = full;
            r.locked = result.last_node;
        }
    }

    fn abort(&mut self, req: u8) {
        let Some(i) = self.pick(req) else { return };
        let r = self.requests.swap_remove(i);
        self.pool.release(&r.pages[r.tree_pages..]).expect("release of own pages");
        for _ in 0..=r.extra_locks {
            self.cache.unlock(r.locked).expect("unlock at abort");
            self.model.add_locks(&r.tokens, self.ps, r.tree_pages, -1);
        }
    }

    /// Evicts through the real cache and checks what went against the model.
    fn evict(&mut self, n: usize) {
        let evictable: usize = self.model.entries.values().filter(|e| e.locks == 0).count();
        let free_before = self.pool.free_pages();
        let freed = self.cache.evict(n, &mut self.pool).expect("evict");
        assert_eq!(self.pool.free_pages(), free_before + freed);
        assert!(freed >= n.min(evictable), "evict({n}) freed {freed} of {evictable} evictable");
        assert!(freed <= evictable);

        let remaining: BTreeMap<Vec<u32>, PageId> =
            self.cache.cached_prefixes().into_iter().collect();
        let gone: Vec<(Vec<u32>, Entry)> = self
            .model
            .entries
            .iter()
            .filter(|(k, _)| !remaining.contains_key(*k))
            .map(|(k, e)| (k.clone(), *e))
            .collect();
        assert_eq!(gone.len(), freed, "evict reported {freed}, the tree lost {}", gone.len());
        for (prefix, entry) in &gone {
            assert_eq!(entry.locks, 0, "evicted a locked prefix {prefix:?}");
            assert_eq!(self.pool.state(entry.page), Some(PageState::Free));
            self.model.entries.remove(prefix);
        }
        // LRU: nothing evicted was used after any unlocked leaf that stayed.
        if let Some(newest_gone) = gone.iter().map(|(_, e)| e.last_access).max() {
            for (prefix, e) in &self.model.entries {
                if e.locks == 0 && self.model.is_leaf(prefix) {
                    assert!(
                        e.last_access >= newest_gone,
                        "evicted something used at {newest_gone} but kept a leaf used at {}",
                        e.last_access
                    );
                }
            }
        }
    }

    /// Everything observable, to show a failed call changed nothing.
    fn snapshot(&self) -> impl PartialEq + std::fmt::Debug + use<> {
        let states: Vec<_> =
            (0..self.pool.num_pages() as u32).map(|p| self.pool.state(PageId(p))).collect();
        let locks: Vec<_> = self.requests.iter().map(|r| self.cache.lock_count(r.locked)).collect();
        (self.cache.cached_prefixes(), self.cache.metrics(), self.pool.counts(), states, locks)
    }

    fn bad_call(&mut self, bad: BadCall) {
        let before = self.snapshot();
        let err = match bad {
            BadCall::ReleaseFree => {
                let Some(page) = self.find_page(PageState::Free) else { return };
                let err = self.pool.release(&[page]).unwrap_err();
                assert_eq!(err, KvError::DoubleFree(page));
                err
            }
            BadCall::ReleaseCached => {
                let Some(page) = self.find_page(PageState::Cached) else { return };
                let err = self.pool.release(&[page]).unwrap_err();
                assert_eq!(err, KvError::NotOwned { page, state: PageState::Cached });
                err
            }
            BadCall::ReleaseTwice => {
                let Some(r) = self.requests.iter().find(|r| r.pages.len() > r.tree_pages) else {
                    return;
                };
                let own = &r.pages[r.tree_pages..];
                let list: Vec<PageId> = own.iter().chain(&own[..1]).copied().collect();
                let err = self.pool.release(&list).unwrap_err();
                assert_eq!(err, KvError::DoubleFree(own[0]));
                err
            }
            BadCall::ReleaseOutOfRange => {
                let page = PageId(self.pool.num_pages() as u32);
                self.pool.release(&[page]).unwrap_err()
            }
            BadCall::Unlock(pick) => {
                if self.seen_nodes.is_empty() {
                    return;
                }
                let node = self.seen_nodes[pick as usize % self.seen_nodes.len()];
                match self.cache.lock_count(node) {
                    Ok(0) if !node.is_root() => {
                        let err = self.cache.unlock(node).unwrap_err();
                        assert_eq!(err, KvError::LockUnderflow(node));
                        err
                    }
                    Ok(_) => return, // someone's real lock, or the root
                    Err(stale) => {
                        assert_eq!(stale, KvError::StaleNode(node));
                        self.cache.unlock(node).unwrap_err()
                    }
                }
            }
            BadCall::InsertWrongCount | BadCall::InsertFreePage => {
                let Some(r) = self.requests.iter_mut().find(|r| r.tokens.len() >= self.ps) else {
                    return;
                };
                let full = r.tokens.len() / self.ps;
                let mut pages = r.pages[..full].to_vec();
                if matches!(bad, BadCall::InsertWrongCount) {
                    pages.push(pages[0]);
                } else {
                    let Some(free) = (0..self.pool.num_pages() as u32)
                        .map(PageId)
                        .find(|&p| self.pool.state(p) == Some(PageState::Free))
                    else {
                        return;
                    };
                    *pages.last_mut().unwrap() = free;
                }
                let copy = pages.clone();
                let tokens = &r.tokens[..full * self.ps];
                let err = self.cache.insert(tokens, &mut pages, &mut self.pool).unwrap_err();
                assert_eq!(pages, copy, "a failed insert rewrote the caller's pages");
                match bad {
                    BadCall::InsertWrongCount => assert!(
                        matches!(err, KvError::PageCountMismatch { .. }),
                        "wrong count gave {err:?}"
                    ),
                    _ => assert!(
                        matches!(err, KvError::NotOwned { state: PageState::Free, .. }),
                        "a free page gave {err:?}"
                    ),
                }
                err
            }
        };
        assert_eq!(self.snapshot(), before, "{bad:?} failed ({err}) but changed state");
    }

    fn find_page(&self, state: PageState) -> Option<PageId> {
        (0..self.pool.num_pages() as u32).map(PageId).find(|&p| self.pool.state(p) == Some(state))
    }

    /// All invariants, after every operation.
    pub fn check(&self) {
        let ps = self.ps;
        self.pool.check_invariants().unwrap();
        self.cache.check_invariants(&self.pool).unwrap();

        // The tree holds exactly what the model says, page for page.
        let real: BTreeMap<Vec<u32>, PageId> = self.cache.cached_prefixes().into_iter().collect();
        let model: BTreeMap<Vec<u32>, PageId> =
            self.model.entries.iter().map(|(k, e)| (k.clone(), e.page)).collect();
        assert_eq!(real, model, "tree contents differ from the model");

        // Every page is free, owned by exactly one live request, or the tree's.
        let mut owner: Vec<Option<usize>> = vec![None; self.pool.num_pages()];
        for (i, r) in self.requests.iter().enumerate() {
            assert_eq!(r.pages.len(), r.tokens.len().div_ceil(ps));
            for &page in &r.pages[r.tree_pages..] {
                let slot = &mut owner[page.index()];
                assert!(slot.is_none(), "page {page} owned by two requests");
                *slot = Some(i);
            }
            // The tree pages a request reads are the tree's and stay locked.
            let prefix = &r.tokens[..r.tree_pages * ps];
            assert_eq!(r.pages[..r.tree_pages], self.model.pages_of(prefix, ps, r.tree_pages)[..]);
            for j in 1..=r.tree_pages {
                assert!(self.model.entries[&prefix[..j * ps]].locks > 0, "a used page is unlocked");
            }
            assert_eq!(
                self.cache.lock_count(r.locked).unwrap() > 0,
                r.tree_pages > 0,
                "a request's node lost its lock"
            );
        }
        let cached: std::collections::HashSet<PageId> = model.values().copied().collect();
        for (p, owned_by) in owner.iter().enumerate() {
            let page = PageId(p as u32);
            let expected = match (owned_by.is_some(), cached.contains(&page)) {
                (true, false) => PageState::Owned,
                (false, true) => PageState::Cached,
                (false, false) => PageState::Free,
                (true, true) => panic!("page {page} both owned and cached"),
            };
            assert_eq!(self.pool.state(page), Some(expected), "state of page {page}");
        }

        // Lock totals agree with the model.
        let m = self.cache.metrics();
        let protected = self.model.entries.values().filter(|e| e.locks > 0).count();
        assert_eq!(m.protected_pages, protected);
        assert_eq!(m.evictable_pages, self.model.entries.len() - protected);
        assert_eq!(m.cached_pages, self.model.entries.len());
    }

    /// Ends every request, drops every lock, evicts everything: no page may leak.
    pub fn drain(&mut self) {
        while !self.requests.is_empty() {
            let finish = self.requests.len().is_multiple_of(2);
            if finish {
                self.insert_request(0, true);
            } else {
                self.abort(0);
            }
            self.check();
        }
        assert_eq!(self.cache.metrics().protected_pages, 0, "locks left after all requests ended");
        let cached = self.cache.cached_pages();
        assert_eq!(self.cache.evict(usize::MAX, &mut self.pool), Ok(cached));
        self.model.entries.clear();
        self.check();
        let counts = self.pool.counts();
        assert_eq!(
            (counts.free, counts.owned, counts.cached),
            (counts.total, 0, 0),
            "pages leaked"
        );
        assert_eq!(self.cache.metrics().nodes, 0);
    }
}

/// Decodes a fuzzer's bytes into a pool shape and a list of operations.
pub fn decode(data: &[u8]) -> (usize, usize, Vec<Op>) {
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    let page_size = 1 << (next().unwrap_or(2) % 4);
    let num_pages = 4 + next().unwrap_or(28) as usize % 60;
    let mut ops = Vec::new();
    while let Some(code) = next() {
        let mut arg = || next().unwrap_or(0);
        let prompt = |a: u8, b: u8, c: u8, d: u8| Prompt {
            base: a,
            shared: b,
            tail_len: c,
            tail_seed: d as u32 * 7919,
        };
        let op = match code % 12 {
            0 | 1 => Op::Admit(prompt(arg(), arg(), arg(), arg())),
            2 => Op::Generate { req: arg(), n: arg(), seed: arg() as u32 },
            3 => Op::CacheUnfinished { req: arg() },
            4 => Op::Finish { req: arg() },
            5 => Op::Abort { req: arg() },
            6 => Op::Match(prompt(arg(), arg(), arg(), arg())),
            7 => Op::ExtraLock { req: arg() },
            8 => Op::ExtraUnlock { req: arg() },
            9 => Op::Evict { n: arg() % 32 },
            _ => Op::Bad(match arg() % 7 {
                0 => BadCall::ReleaseFree,
                1 => BadCall::ReleaseCached,
                2 => BadCall::ReleaseTwice,
                3 => BadCall::ReleaseOutOfRange,
                4 => BadCall::Unlock(arg()),
                5 => BadCall::InsertWrongCount,
                _ => BadCall::InsertFreePage,
            }),
        };
        ops.push(op);
    }
    (num_pages, page_size, ops)
}
