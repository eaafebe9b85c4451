//! Tree nodes and the arena that holds them.
//!
//! Nodes live in one `Vec` and refer to each other by index; a freed slot is reused
//! by the next new node. Indices are internal: the public [`NodeId`] adds the slot's
//! generation, bumped every time the slot is freed, so an id kept past its node's
//! eviction is detected (`KvError::StaleNode`) instead of naming a stranger.

use std::collections::HashMap;

use crate::pool::PageId;

/// Index of the root node; the root is never freed.
pub(crate) const ROOT: u32 = 0;

/// A handle on a tree node, as returned by `match_prefix` and `insert` and taken by
/// `lock` and `unlock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId {
    index: u32,
    generation: u32,
}

impl NodeId {
    /// The root: the empty prefix. Locking it is a no-op.
    pub const ROOT: NodeId = NodeId { index: ROOT, generation: 0 };

    /// Whether this is the root (an empty match).
    pub fn is_root(self) -> bool {
        self.index == ROOT
    }
}

/// Children keyed by the tokens of their first page.
///
/// The key is the whole first page, so a lookup is one hash of `page_size` tokens
/// and then a `memcmp`-style comparison of the child's tokens; no per-token map
/// lookups. The std hasher is kept (not a faster unkeyed one) because token ids come
/// from users: a keyed hash stops crafted prompts from piling into one bucket.
pub(crate) type ChildMap = HashMap<Box<[u32]>, u32>;

/// One node: a run of whole pages that all sequences through this node share.
#[derive(Debug, Clone, Default)]
pub(crate) struct Node {
    /// Parent index (meaningless for the root).
    pub parent: u32,
    /// Bumped when the slot is freed; part of [`NodeId`].
    pub generation: u32,
    /// False while the slot is on the free list.
    pub live: bool,
    /// The tokens of this node, `pages.len() * page_size` of them.
    pub tokens: Vec<u32>,
    /// The pages holding those tokens' KV; owned by the tree.
    pub pages: Vec<PageId>,
    pub children: ChildMap,
    /// Running requests whose matched path goes through this node.
    pub lock_ref: u32,
    /// Logical time of the last match or insert through this node.
    pub last_access: u64,
    /// The key under which this node sits in the evictable-leaf set, if it does.
    pub lru_key: Option<u64>,
}

impl Node {
    pub fn is_leaf(&self) -> bool {
        self.children.is_empty()
    }
}

/// Slot storage for nodes, with reuse of freed slots.
#[derive(Debug, Clone)]
pub(crate) struct Arena {
    nodes: Vec<Node>,
    free_slots: Vec<u32>,
}

impl Arena {
    /// An arena holding only the root.
    pub fn new() -> Self {
        let root = Node { live: true, ..Node::default() };
        Self { nodes: vec![root], free_slots: Vec::new() }
    }

    /// Stores a new live node and returns its index.
    pub fn alloc(&mut self, mut node: Node) -> u32 {
        node.live = true;
        match self.free_slots.pop() {
            Some(index) => {
                node.generation = self.nodes[index as usize].generation;
                self.nodes[index as usize] = node;
                index
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    /// The index the next [`Self::alloc`] will return.
    pub fn next_index(&self) -> u32 {
        match self.free_slots.last() {
            Some(&index) => index,
            None => self.nodes.len() as u32,
        }
    }

    /// Frees a node's slot (and its token and page memory) for reuse.
    pub fn free(&mut self, index: u32) {
        debug_assert_ne!(index, ROOT);
        let slot = &mut self.nodes[index as usize];
        let generation = slot.generation.wrapping_add(1);
        *slot = Node { generation, ..Node::default() };
        self.free_slots.push(index);
    }

    /// The index of a live node named by `id`, if it is one.
    pub fn resolve(&self, id: NodeId) -> Option<u32> {
        let node = self.nodes.get(id.index as usize)?;
        (node.live && node.generation == id.generation).then_some(id.index)
    }

    /// The public id of the live node at `index`.
    pub fn id_of(&self, index: u32) -> NodeId {
        NodeId { index, generation: self.nodes[index as usize].generation }
    }

    /// Live nodes (root included).
    pub fn live_count(&self) -> usize {
        self.nodes.len() - self.free_slots.len()
    }

    /// All slots, live or not, with their indices.
    pub fn slots(&self) -> impl Iterator<Item = (u32, &Node)> {
        self.nodes.iter().enumerate().map(|(i, n)| (i as u32, n))
    }

    pub fn free_slots(&self) -> &[u32] {
        &self.free_slots
    }
}

impl std::ops::Index<u32> for Arena {
    type Output = Node;
    fn index(&self, index: u32) -> &Node {
        &self.nodes[index as usize]
    }
}

impl std::ops::IndexMut<u32> for Arena {
    fn index_mut(&mut self, index: u32) -> &mut Node {
        &mut self.nodes[index as usize]
    }
}
