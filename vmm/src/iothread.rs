//! The event loops of a machine: one per `-object iothread`, created when
//! a device first names it, plus the main loop for devices that name none.

use std::collections::BTreeMap;
use std::sync::Arc;

use devices::virtio::event_loop::EventLoop;

pub struct IoThreads {
    ids: Vec<String>,
    loops: BTreeMap<String, Arc<EventLoop>>,
}

const MAIN_LOOP: &str = "main-loop";

impl IoThreads {
    pub fn new(ids: &[String]) -> Self {
        IoThreads {
            ids: ids.to_vec(),
            loops: BTreeMap::new(),
        }
    }

    pub fn get(&mut self, id: Option<&str>) -> Result<Arc<EventLoop>, String> {
        let name = match id {
            Some(i) if self.ids.iter().any(|x| x == i) => i,
            Some(i) => {
                return Err(format!(
                    "iothread '{i}' does not exist (use -object iothread,id={i})"
                ))
            }
            None => MAIN_LOOP,
        };
        if let Some(l) = self.loops.get(name) {
            return Ok(l.clone());
        }
        let l = EventLoop::new(name)?;
        self.loops.insert(name.to_string(), l.clone());
        Ok(l)
    }
}
