use super::*;
use crate::pool::PageState;

const PS: usize = 4;

fn setup(num_pages: usize) -> (PagePool, RadixCache) {
    let pool = PagePool::new(num_pages, PS).unwrap();
    let cache = RadixCache::new(&pool);
    (pool, cache)
}

fn seq(start: u32, len: usize) -> Vec<u32> {
    (start..start + len as u32).collect()
}

/// Allocates pages for `tokens` (whole pages only) and inserts them.
fn put(cache: &mut RadixCache, pool: &mut PagePool, tokens: &[u32]) -> (Vec<PageId>, InsertResult) {
    let mut pages = pool.alloc(tokens.len() / PS).unwrap();
    let result = cache.insert(tokens, &mut pages, pool).unwrap();
    cache.check_invariants(pool).unwrap();
    (pages, result)
}

#[test]
fn empty_cache_matches_nothing() {
    let (pool, mut cache) = setup(8);
    let m = cache.match_prefix(&seq(0, 10));
    assert_eq!(m, MatchResult { pages: vec![], matched_tokens: 0, last_node: NodeId::ROOT });
    assert_eq!(cache.metrics().miss_tokens, 10);
    assert_eq!(cache.metrics().hit_rate(), 0.0);
    cache.check_invariants(&pool).unwrap();
}

#[test]
fn match_is_page_aligned_and_splits_at_the_boundary() {
    let (mut pool, mut cache) = setup(16);
    let tokens = seq(0, 16);
    let (pages, inserted) = put(&mut cache, &mut pool, &tokens);
    assert_eq!(inserted.new_pages, 4);
    assert_eq!(pool.counts().cached, 4);

    // Whole hit.
    let m = cache.match_prefix(&tokens);
    assert_eq!((m.pages.clone(), m.matched_tokens), (pages.clone(), 16));
    assert_eq!(m.last_node, inserted.last_node);

    // 11 tokens: at most 8 can match; the node splits after its second page.
    let m = cache.match_prefix(&tokens[..11]);
    assert_eq!((m.pages.as_slice(), m.matched_tokens), (&pages[..2], 8));
    assert_eq!(cache.metrics().nodes, 2);
    assert_ne!(m.last_node, inserted.last_node);
    cache.check_invariants(&pool).unwrap();

    // Divergence inside the third page: two pages match.
    let mut other = tokens.clone();
    other[9] = 999;
    assert_eq!(cache.match_prefix(&other).matched_tokens, 8);
    // Divergence inside the first page: nothing matches.
    other[1] = 999;
    assert_eq!(cache.match_prefix(&other).matched_tokens, 0);
    assert_eq!(cache.peek_prefix(&tokens), 16);
    let m = cache.metrics();
    assert_eq!(m.hit_tokens, 16 + 8 + 8);
    assert_eq!(m.miss_tokens, 3 + 8 + 16);
}

#[test]
fn insert_shares_prefix_and_frees_duplicates() {
    let (mut pool, mut cache) = setup(16);
    let a = seq(0, 12);
    let (a_pages, _) = put(&mut cache, &mut pool, &a);

    // b shares a's first two pages but was computed separately (its own pages).
    let mut b = a[..8].to_vec();
    b.extend(seq(100, 8));
    let mut b_pages = pool.alloc(4).unwrap();
    let own = b_pages.clone();
    let r = cache.insert(&b, &mut b_pages, &mut pool).unwrap();
    assert_eq!((r.prefix_pages, r.new_pages, r.released_duplicates), (2, 2, 2));
    // The slice now lists the tree's pages; the two duplicates went back to the pool.
    assert_eq!(&b_pages[..2], &a_pages[..2]);
    assert_eq!(&b_pages[2..], &own[2..]);
    assert_eq!(pool.state(own[0]), Some(PageState::Free));
    assert_eq!(pool.counts().cached, 5);
    cache.check_invariants(&pool).unwrap();
    assert_eq!(cache.match_prefix(&b).pages, b_pages);
    assert_eq!(cache.metrics().duplicate_pages, 2);
}

#[test]
fn insert_keeps_tree_pages_obtained_by_match() {
    let (mut pool, mut cache) = setup(16);
    let prompt = seq(0, 8);
    put(&mut cache, &mut pool, &prompt);

    // A request matches the prompt, locks it, then generates 8 more tokens.
    let hit = cache.match_prefix(&prompt);
    cache.lock(hit.last_node).unwrap();
    let mut pages = hit.pages.clone();
    pool.alloc_into(&mut pages, 2).unwrap();
    let full = seq(0, 16);
    let before = pages.clone();
    let r = cache.insert(&full, &mut pages, &mut pool).unwrap();
    assert_eq!((r.prefix_pages, r.new_pages, r.released_duplicates), (2, 2, 0));
    assert_eq!(pages, before);
    // Lock handover for an unfinished request.
    cache.lock(r.last_node).unwrap();
    cache.unlock(hit.last_node).unwrap();
    assert_eq!(cache.metrics().protected_pages, 4);
    cache.check_invariants(&pool).unwrap();
    cache.unlock(r.last_node).unwrap();
    assert_eq!(cache.metrics().evictable_pages, 4);
}

#[test]
fn inserting_a_prefix_of_a_node_splits_it() {
    let (mut pool, mut cache) = setup(16);
    let (pages, _) = put(&mut cache, &mut pool, &seq(0, 16));
    let mut short = pool.alloc(2).unwrap();
    let r = cache.insert(&seq(0, 8), &mut short, &mut pool).unwrap();
    assert_eq!((r.prefix_pages, r.new_pages, r.released_duplicates), (2, 0, 2));
    assert_eq!(short, &pages[..2]);
    assert_eq!(cache.metrics().nodes, 2);
    cache.check_invariants(&pool).unwrap();
}

#[test]
fn locks_move_pages_between_evictable_and_protected() {
    let (mut pool, mut cache) = setup(16);
    let (_, r) = put(&mut cache, &mut pool, &seq(0, 16));
    let upper = cache.match_prefix(&seq(0, 8)).last_node;
    cache.lock(r.last_node).unwrap();
    cache.lock(upper).unwrap();
    assert_eq!(cache.lock_count(upper), Ok(2));
    assert_eq!(cache.lock_count(r.last_node), Ok(1));
    let m = cache.metrics();
    assert_eq!((m.evictable_pages, m.protected_pages), (0, 4));
    cache.unlock(r.last_node).unwrap();
    let m = cache.metrics();
    assert_eq!((m.evictable_pages, m.protected_pages), (2, 2));
    cache.check_invariants(&pool).unwrap();

    // The lower node is evictable, the locked upper one is not.
    assert_eq!(cache.evict(100, &mut pool), Ok(2));
    assert!(!cache.contains_node(r.last_node));
    assert_eq!(cache.evict(100, &mut pool), Ok(0));
    cache.unlock(upper).unwrap();
    assert_eq!(cache.evict(1, &mut pool), Ok(2));
    assert_eq!(pool.counts().free, 16);
    cache.check_invariants(&pool).unwrap();
}

#[test]
fn lock_survives_a_split_of_its_node() {
    let (mut pool, mut cache) = setup(16);
    let (_, r) = put(&mut cache, &mut pool, &seq(0, 16));
    cache.lock(r.last_node).unwrap();
    // Splits the locked node; the new upper node inherits the lock.
    let upper = cache.match_prefix(&seq(0, 4)).last_node;
    assert_eq!(cache.lock_count(upper), Ok(1));
    assert_eq!(cache.metrics().protected_pages, 4);
    cache.check_invariants(&pool).unwrap();
    cache.unlock(r.last_node).unwrap();
    assert_eq!(cache.lock_count(upper), Ok(0));
    assert_eq!(cache.metrics().evictable_pages, 4);
    cache.check_invariants(&pool).unwrap();
}

#[test]
fn evicts_least_recently_used_leaves_first() {
    let (mut pool, mut cache) = setup(32);
    let shared = seq(0, 8);
    let branch = |tail: u32| {
        let mut s = shared.clone();
        s.extend(seq(tail, 4));
        s
    };
    put(&mut cache, &mut pool, &branch(100));
    put(&mut cache, &mut pool, &branch(200));
    put(&mut cache, &mut pool, &branch(300));
    put(&mut cache, &mut pool, &seq(1000, 8));
    // Touch branch 100 so 200 is the oldest leaf, then 300.
    cache.match_prefix(&branch(100));

    assert_eq!(cache.evict(1, &mut pool), Ok(1));
    assert_eq!(cache.peek_prefix(&branch(200)), 8);
    assert_eq!(cache.peek_prefix(&branch(300)), 12);
    assert_eq!(cache.evict(1, &mut pool), Ok(1));
    assert_eq!(cache.peek_prefix(&branch(300)), 8);
    // Next oldest is the unrelated sequence (2 pages), then branch 100 and, once its
    // last child is gone, the shared parent, offered in the same call.
    assert_eq!(cache.evict(2, &mut pool), Ok(2));
    assert_eq!(cache.peek_prefix(&seq(1000, 8)), 0);
    assert_eq!(cache.evict(3, &mut pool), Ok(3));
    assert_eq!(cache.cached_pages(), 0);
    assert_eq!(cache.metrics().evicted_pages, 7);
    assert_eq!(cache.metrics().nodes, 0);
    cache.check_invariants(&pool).unwrap();
}

#[test]
fn bad_calls_fail_and_change_nothing() {
    let (mut pool, mut cache) = setup(16);
    let (tree_pages, r) = put(&mut cache, &mut pool, &seq(0, 8));
    let owned = pool.alloc(3).unwrap();
    pool.release(&owned[2..]).unwrap();
    let snapshot = |cache: &RadixCache, pool: &PagePool| {
        (cache.cached_prefixes(), cache.metrics(), pool.counts(), pool.check_invariants())
    };
    let before = snapshot(&cache, &pool);

    // Wrong page count.
    let mut pages = owned.clone();
    let err = cache.insert(&seq(0, 8), &mut pages, &mut pool).unwrap_err();
    assert_eq!(err, KvError::PageCountMismatch { tokens: 8, pages: 3, page_size: PS });
    // A page listed twice.
    let mut pages = vec![owned[0], owned[0]];
    assert_eq!(
        cache.insert(&seq(50, 8), &mut pages, &mut pool),
        Err(KvError::DuplicatePage(owned[0]))
    );
    // A free page (use after release).
    let mut pages = vec![owned[0], owned[2]];
    assert_eq!(
        cache.insert(&seq(50, 8), &mut pages, &mut pool),
        Err(KvError::NotOwned { page: owned[2], state: PageState::Free })
    );
    // A tree page in the wrong place (also fails after the matched part checks out).
    let mut pages = vec![tree_pages[1], owned[0]];
    let err = cache.insert(&seq(0, 8), &mut pages, &mut pool).unwrap_err();
    assert_eq!(err, KvError::NotOwned { page: tree_pages[1], state: PageState::Cached });
    let mut pages = vec![tree_pages[0], tree_pages[1], tree_pages[0]];
    assert!(cache.insert(&seq(0, 12), &mut pages, &mut pool).is_err());
    assert_eq!(pages, vec![tree_pages[0], tree_pages[1], tree_pages[0]]);
    // Out-of-range page.
    let mut pages = vec![PageId(99)];
    assert!(matches!(
        cache.insert(&seq(70, 4), &mut pages, &mut pool),
        Err(KvError::PageOutOfRange { .. })
    ));
    // Unlock below zero.
    assert_eq!(cache.unlock(r.last_node), Err(KvError::LockUnderflow(r.last_node)));
    // A foreign pool.
    let mut other = PagePool::new(16, PS).unwrap();
    let mut pages = other.alloc(1).unwrap();
    assert_eq!(cache.insert(&seq(80, 4), &mut pages, &mut other), Err(KvError::WrongPool));
    assert_eq!(cache.evict(1, &mut other), Err(KvError::WrongPool));
    assert_eq!(snapshot(&cache, &pool), before);
    cache.check_invariants(&pool).unwrap();

    // A stale node id, after its node was evicted and its slot reused.
    cache.evict(16, &mut pool).unwrap();
    put(&mut cache, &mut pool, &seq(200, 4));
    assert_eq!(cache.lock(r.last_node), Err(KvError::StaleNode(r.last_node)));
    assert_eq!(cache.unlock(r.last_node), Err(KvError::StaleNode(r.last_node)));
    assert_eq!(cache.metrics().protected_pages, 0);
}

#[test]
fn root_locks_and_empty_inserts_are_no_ops() {
    let (mut pool, mut cache) = setup(4);
    cache.lock(NodeId::ROOT).unwrap();
    cache.unlock(NodeId::ROOT).unwrap();
    cache.unlock(NodeId::ROOT).unwrap();
    let r = cache.insert(&[], &mut [], &mut pool).unwrap();
    assert_eq!(r.last_node, NodeId::ROOT);
    assert!(r.last_node.is_root());
    assert_eq!(cache.evict(0, &mut pool), Ok(0));
    cache.check_invariants(&pool).unwrap();
}

#[test]
fn page_size_one_matches_token_by_token() {
    let mut pool = PagePool::new(32, 1).unwrap();
    let mut cache = RadixCache::new(&pool);
    let mut pages = pool.alloc(5).unwrap();
    cache.insert(&[1, 2, 3, 4, 5], &mut pages, &mut pool).unwrap();
    let mut pages2 = pool.alloc(4).unwrap();
    let r = cache.insert(&[1, 2, 9, 9], &mut pages2, &mut pool).unwrap();
    assert_eq!((r.prefix_pages, r.released_duplicates), (2, 2));
    assert_eq!(cache.match_prefix(&[1, 2, 3, 7]).matched_tokens, 3);
    assert_eq!(cache.metrics().nodes, 4);
    cache.check_invariants(&pool).unwrap();
    assert_eq!(
        cache.cached_prefixes().iter().map(|(t, _)| t.len()).sum::<usize>(),
        1 + 2 + 3 + 4 + 5 + 3 + 4
    );
}

#[test]
fn snapshot_is_independent() {
    let (mut pool, mut cache) = setup(8);
    put(&mut cache, &mut pool, &seq(0, 8));
    let (mut cache2, mut pool2) = cache.snapshot(&pool).unwrap();
    cache2.evict(8, &mut pool2).unwrap();
    cache2.check_invariants(&pool2).unwrap();
    assert_eq!(cache.cached_pages(), 2);
    assert_eq!(cache2.cached_pages(), 0);
    assert_eq!(cache.snapshot(&pool2).unwrap_err(), KvError::WrongPool);
    assert!(cache.check_invariants(&pool2).is_err());
}
