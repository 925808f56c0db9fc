//! Golden tests for the planner: each directory under `tests/golden/` holds Kubernetes objects
//! (`objects.yaml`) and the plan node `node-a` must compute from them (`expected.json`: the
//! `plan -o json` list and the problems reported). Set GOLDEN_UPDATE=1 to rewrite the
//! expectations after a deliberate change, then review the diff.
use std::path::Path;

use dataplane_agent::{plan, source::manifests::ManifestDir};

const NODE: &str = "node-a";

#[test]
fn plans_match_golden_files() {
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
        let got = serde_json::json!({
            "frontends": plan.frontends.iter().map(|f| f.to_json()).collect::<Vec<_>>(),
            "problems": plan.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        });
        let expected_path = case.join("expected.json");
        if std::env::var_os("GOLDEN_UPDATE").is_some() {
            std::fs::write(
                &expected_path,
                serde_json::to_string_pretty(&got).unwrap() + "\n",
            )
            .unwrap();
            continue;
        }
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&expected_path).unwrap()).unwrap();
        if got != expected {
            failures.push(format!(
                "{}:\n got {}\n want {}",
                case.file_name().unwrap().to_string_lossy(),
                serde_json::to_string_pretty(&got).unwrap(),
                serde_json::to_string_pretty(&expected).unwrap()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
