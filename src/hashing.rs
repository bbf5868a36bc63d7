//! Maps and sets on hot paths (a room's peers, its clients' clocks and places, the rooms an
//! append registers), hashed for speed.
//!
//! A room looks up its clients' clocks and places several times for every update it applies,
//! and each peer once for every delivery. With std's SipHash, hashing took about 6 % of the room
//! path's time (docs/benchmarks.md, session 10). foldhash is far cheaper on integer keys, and
//! every map gets its own random seed, so a client cannot choose ids that collide without first
//! learning the seed. (yrs itself keys its block store by client id with no seed at all.)

use std::collections::{HashMap, HashSet};

/// A `HashMap` hashed with a per-map random seed by foldhash.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A `HashSet` hashed with a per-set random seed by foldhash.
pub(crate) type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;
