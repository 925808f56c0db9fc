//! Golden tests for the planner and the translation: each directory under `tests/golden/`
//! holds Kubernetes objects (`objects.yaml`), the plan node `node-a` must compute from them
//! (`expected.json`: the `plan -o json` list and the problems reported), and every map entry
//! that plan becomes on empty maps (`maps.json`: each key and value, as `translate` writes
//! them). Set GOLDEN_UPDATE=1 to rewrite the expectations after a deliberate change, then
//! review the diff.
use std::{net::SocketAddr, path::Path};

use dataplane_agent::{
    datapath::{
        family::Family,
        translate::{self, FamilyContents, Ids, MapContents},
    },
    plan,
    source::manifests::ManifestDir,
};
use dataplane_common::{
    SVC_FLAG_AFFINITY, SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_EXTERNAL, SVC_FLAG_EXTERNAL_LOCAL,
    SVC_FLAG_MAGLEV, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
};
use serde_json::{Map, Value, json};

const NODE: &str = "node-a";

fn flag_names(flags: u16) -> String {
    let names: Vec<&str> = [
        (SVC_FLAG_DROP_WHEN_EMPTY, "DROP_WHEN_EMPTY"),
        (SVC_FLAG_EXTERNAL, "EXTERNAL"),
        (SVC_FLAG_EXTERNAL_LOCAL, "EXTERNAL_LOCAL"),
        (SVC_FLAG_TWO_SCOPES, "TWO_SCOPES"),
        (SVC_FLAG_AFFINITY, "AFFINITY"),
        (SVC_FLAG_SOURCE_RANGES, "SOURCE_RANGES"),
        (SVC_FLAG_MAGLEV, "MAGLEV"),
    ]
    .into_iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| n)
    .collect();
    names.join("|")
}

/// One family's service map, backend array and source ranges, as text.
fn render_family<A: Family>(c: &FamilyContents<A>) -> (Value, Value, Value) {
    let mut services = Map::new();
    for (k, v) in &c.services {
        assert_eq!(k._pad, [0; 2]);
        services.insert(
            format!(
                "{} proto {} scope {} slot {}",
                SocketAddr::new(k.addr.ip(), k.port),
                k.proto,
                k.scope,
                k.backend_slot
            ),
            json!(format!(
                "backend_id {} rev_nat_id {} count {} flags {} [{}] affinity_timeout {} service_port_id {}",
                v.backend_id,
                v.rev_nat_id,
                v.count,
                v.flags,
                flag_names(v.flags),
                v.affinity_timeout,
                v.service_port_id
            )),
        );
    }
    let backends: Map<String, Value> = (c.backends.iter())
        .map(|(id, b)| {
            let text = format!(
                "{} proto {} state {}",
                SocketAddr::new(b.addr.ip(), b.port),
                b.proto,
                b.state
            );
            (id.to_string(), json!(text))
        })
        .collect();
    let ranges: Vec<String> = (c.source_ranges.iter())
        .map(|(prefix, key)| {
            let (id, cidr) = translate::decode_source_range(*prefix, key);
            format!("prefix_len {prefix}: frontend {id} {cidr}")
        })
        .collect();
    (json!(services), json!(backends), json!(ranges))
}

/// Every entry, every field (padding is checked to be zero), as text a reviewer can read.
fn render(c: &MapContents) -> Value {
    let (services, backends, ranges) = render_family(&c.v4);
    let (services6, backends6, ranges6) = render_family(&c.v6);
    let maglev: Map<String, Value> = (c.maglev.iter())
        .map(|(id, table)| {
            let ids: Vec<String> = table.iter().map(u32::to_string).collect();
            (id.to_string(), json!(ids.join(" ")))
        })
        .collect();
    let names: Map<String, Value> = (c.names.iter())
        .map(|(id, n)| {
            assert_eq!(n._pad, [0; 7]);
            let d = translate::decode_name(n);
            let text = format!("{} port {:?} kind {}", d.service, d.port, n.kind);
            (id.to_string(), json!(text))
        })
        .collect();
    json!({
        "dp_svc_v2": services,
        "dp_backends_v2": backends,
        "dp_maglev_v1": maglev,
        "dp_srcrange_v1": ranges,
        "dp_names_v1": names,
        "dp_svc6_v1": services6,
        "dp_be6_v1": backends6,
        "dp_srcrange6_v1": ranges6,
    })
}

/// Compares `got` with the file (or rewrites it under GOLDEN_UPDATE).
fn check(path: &Path, got: &Value, failures: &mut Vec<String>) {
    if std::env::var_os("GOLDEN_UPDATE").is_some() {
        std::fs::write(path, serde_json::to_string_pretty(got).unwrap() + "\n").unwrap();
        return;
    }
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    if *got != expected {
        failures.push(format!(
            "{}:\n got {}\n want {}",
            path.display(),
            serde_json::to_string_pretty(got).unwrap(),
            serde_json::to_string_pretty(&expected).unwrap()
        ));
    }
}

#[test]
fn plans_and_map_contents_match_golden_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 8, "golden cases missing");
    let mut failures = Vec::new();
    for case in cases {
        let mut dir = ManifestDir::new(&case);
        let (objects, skipped) = dir.load(NODE).unwrap();
        assert!(skipped.is_empty(), "{}: {skipped:?}", case.display());
        let plan = plan::compute(&objects, &plan::NodeContext::named(NODE));
        let got = json!({
            "frontends": plan.frontends.iter().map(|f| f.to_json()).collect::<Vec<_>>(),
            "problems": plan.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        });
        check(&case.join("expected.json"), &got, &mut failures);
        let frontends: Vec<&plan::Frontend> = plan.frontends.iter().collect();
        let maps = translate::translate(&frontends, &mut Ids::fresh());
        check(&case.join("maps.json"), &render(&maps), &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
