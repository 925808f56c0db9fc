//! Opening the agent's pinned maps by name, for the bench's own reads and writes. The
//! datapath's map types change as it is tuned (backends went from a hash map to an array);
//! `IdMap` reads and writes id-keyed maps of either type.
use anyhow::Context;
use aya::{
    Pod,
    maps::{Array, HashMap, Map, MapData},
};
use dataplane_agent::datapath::BpffsLayout;

pub fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(
    layout: &BpffsLayout,
    name: &str,
) -> anyhow::Result<T> {
    let data = MapData::from_pin(layout.map(name)).with_context(|| format!("opening {name}"))?;
    T::try_from(Map::from_map_data(data)?).with_context(|| format!("map {name}"))
}

/// An id-keyed map: a hash map, or an array whose unused slots hold zeroes.
pub enum IdMap<V: Pod> {
    Hash(HashMap<MapData, u32, V>),
    Array(Array<MapData, V>),
}

impl<V: Pod> IdMap<V> {
    pub fn open(layout: &BpffsLayout, name: &str) -> anyhow::Result<Self> {
        let data =
            MapData::from_pin(layout.map(name)).with_context(|| format!("opening {name}"))?;
        Ok(match Map::from_map_data(data)? {
            map @ Map::Array(_) => Self::Array(Array::try_from(map)?),
            map => Self::Hash(HashMap::try_from(map).with_context(|| format!("map {name}"))?),
        })
    }

    pub fn get(&self, id: u32) -> Option<V> {
        match self {
            Self::Hash(m) => m.get(&id, 0).ok(),
            Self::Array(m) => m.get(&id, 0).ok(),
        }
    }

    pub fn insert(&mut self, id: u32, value: V) -> anyhow::Result<()> {
        match self {
            Self::Hash(m) => m.insert(id, value, 0)?,
            Self::Array(m) => m.set(id, value, 0)?,
        }
        Ok(())
    }
}
