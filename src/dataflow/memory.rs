//! State a population operator keeps that is not a function of the inputs
//! at one tick, remembered by the tick it changed at so that a checkpoint
//! can take it as of its frontier (see `crate::run::checkpoint`): a
//! clustering's numbering depends on the models before it, and a
//! predictive model's next fit on the features it set aside at
//! `r - horizon`, which a restart from compacted inputs cannot see again.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Per operator of one kind (a clustering, a model): its states by tick,
/// and the state a restart starts from.
#[derive(Debug)]
pub struct Memory<T> {
    states: Vec<Mutex<BTreeMap<u64, T>>>,
    /// Per operator: the state restored from a checkpoint, until a state
    /// recorded after it lies before a checkpoint's frontier (until then a
    /// checkpoint must take it again).
    restored: Vec<Mutex<Option<T>>>,
    /// Whether states are kept until a checkpoint asks for them
    /// ([`Memory::before`]); otherwise only the latest is.
    history: bool,
}

impl<T: Clone> Memory<T> {
    pub fn new(operators: usize, restored: Vec<Option<T>>, history: bool) -> Memory<T> {
        Memory {
            states: (0..operators).map(|_| Default::default()).collect(),
            restored: if restored.is_empty() {
                (0..operators).map(|_| Mutex::new(None)).collect()
            } else {
                restored.into_iter().map(Mutex::new).collect()
            },
            history,
        }
    }

    /// Operator `i`'s state to start from.
    pub fn restored(&self, i: usize) -> Option<T> {
        self.restored[i].lock().expect("not poisoned").clone()
    }

    /// Operator `i`'s state from tick `t` on.
    pub fn record(&self, i: usize, t: u64, state: T) {
        let mut states = self.states[i].lock().expect("not poisoned");
        if !self.history {
            states.clear();
        }
        states.insert(t, state);
    }

    /// Operator `i`'s latest state (the restored one before any).
    pub fn latest(&self, i: usize) -> Option<T> {
        let states = self.states[i].lock().expect("not poisoned");
        states.values().next_back().cloned().or_else(|| self.restored(i))
    }

    /// Each operator's state as of the ticks before `frontier`: the latest
    /// recorded before it, else the restored one (a state recorded at or
    /// after the frontier does not count yet). Older ones are forgotten.
    pub fn before(&self, frontier: u64) -> Vec<Option<T>> {
        self.states
            .iter()
            .zip(&self.restored)
            .map(|(states, restored)| {
                let mut restored = restored.lock().expect("not poisoned");
                let mut states = states.lock().expect("not poisoned");
                let state = states.range(..frontier).next_back().map(|(t, m)| (*t, m.clone()));
                match state {
                    Some((t, state)) => {
                        states.retain(|&k, _| k >= t);
                        *restored = None;
                        Some(state)
                    }
                    None => restored.clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Memory;

    #[test]
    fn a_restored_state_counts_until_a_later_one_is_before_the_frontier() {
        let memory = Memory::new(1, vec![Some("restored")], true);
        memory.record(0, 100, "refit");
        // A checkpoint before the refit's tick still holds the restored state.
        assert_eq!(memory.before(50), vec![Some("restored")]);
        assert_eq!(memory.before(101), vec![Some("refit")]);
        assert_eq!(memory.before(101), vec![Some("refit")]);
        assert_eq!(memory.latest(0), Some("refit"));
    }

    #[test]
    fn without_history_only_the_latest_is_kept() {
        let memory = Memory::new(1, Vec::new(), false);
        assert_eq!(memory.before(10), vec![None]);
        memory.record(0, 5, 1);
        memory.record(0, 8, 2);
        assert_eq!(memory.latest(0), Some(2));
        assert_eq!(memory.before(7), vec![None]);
    }
}
