//! The committed contract artifacts (`contracts/artifacts/*.json`) are what the pinned compiler makes of the
//! committed sources: recompiles with solc-js and compares byte for byte, so the build needs no node but a
//! source edit without a recompile is caught. Also checks our `sol!` bindings against solc's selectors.
//!
//! Environment: `DSTACK_TEST_SOLC_JS` = directory of the npm `solc` package, version 0.8.28 (e.g.
//! `/var/cache/dstack-rs/npm-solc/node_modules/solc`); `node` on PATH (or `DSTACK_TEST_NODE`). Unset: a loud
//! SKIP, unless `DSTACK_REQUIRE_FIXTURES=1`, where the test fails.
//! To refresh the artifacts: `node kms-appliance/contracts/compile.cjs <solc dir>`.

use std::path::Path;
use std::process::Command;

use alloy_sol_types::SolCall;
use dstack_kms::onchain::{APP_AUTH_ARTIFACT, IAppAuthAdmin, IKmsRegistry, KMS_REGISTRY_ARTIFACT};

const SOLC_VERSION: &str = "0.8.28+commit.7893614a";

#[test]
fn contracts_match_artifacts() {
    let Some(solc) = std::env::var_os("DSTACK_TEST_SOLC_JS") else {
        assert!(
            std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() != Ok("1"),
            "DSTACK_TEST_SOLC_JS is not set but DSTACK_REQUIRE_FIXTURES=1"
        );
        eprintln!("!!! SKIP: DSTACK_TEST_SOLC_JS (npm solc package dir) is not set; artifacts not re-checked !!!");
        return;
    };
    let node = std::env::var_os("DSTACK_TEST_NODE").unwrap_or_else(|| "node".into());
    let contracts = Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts");
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(&node)
        .arg(contracts.join("compile.cjs"))
        .arg(&solc)
        .arg(out.path())
        .status()
        .expect("running node");
    assert!(status.success(), "compile.cjs failed");
    for name in ["AppAuth", "KmsRegistry"] {
        let fresh = std::fs::read_to_string(out.path().join(format!("{name}.json"))).unwrap();
        let committed = std::fs::read_to_string(contracts.join(format!("artifacts/{name}.json"))).unwrap();
        assert!(
            fresh.contains(SOLC_VERSION),
            "{name}: compiled with another solc than the pinned {SOLC_VERSION}"
        );
        assert!(
            fresh == committed,
            "contracts/artifacts/{name}.json is stale: rerun `node contracts/compile.cjs {}`",
            solc.to_string_lossy()
        );
    }
}

/// The check above would notice an edit: any source change (even a comment, via the metadata hash) changes the
/// bytecode.
#[test]
fn a_source_edit_changes_the_artifact() {
    let Some(solc) = std::env::var_os("DSTACK_TEST_SOLC_JS") else {
        eprintln!("!!! SKIP: DSTACK_TEST_SOLC_JS is not set !!!");
        return;
    };
    let node = std::env::var_os("DSTACK_TEST_NODE").unwrap_or_else(|| "node".into());
    let contracts = Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts");
    let copy = tempfile::tempdir().unwrap();
    for f in [
        "IAppAuth.sol",
        "Owned.sol",
        "AppAuth.sol",
        "KmsRegistry.sol",
        "compile.cjs",
    ] {
        std::fs::copy(contracts.join(f), copy.path().join(f)).unwrap();
    }
    let app = copy.path().join("AppAuth.sol");
    let mut src = std::fs::read_to_string(&app).unwrap();
    src.push_str("// an edit\n");
    std::fs::write(&app, src).unwrap();
    let status = Command::new(&node)
        .arg(copy.path().join("compile.cjs"))
        .arg(&solc)
        .status()
        .expect("running node");
    assert!(status.success());
    let bytecode = |dir: &Path| {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("AppAuth.json")).unwrap()).unwrap();
        v["bytecode"].as_str().unwrap().to_owned()
    };
    assert_ne!(
        bytecode(&copy.path().join("artifacts")),
        bytecode(&contracts.join("artifacts"))
    );
}

/// Our `sol!` declarations must have the selectors solc computed for the real contracts.
#[test]
fn bindings_match_solc_selectors() {
    fn ids(artifact: &str) -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(artifact).unwrap()["methodIdentifiers"].clone()
    }
    fn check<C: SolCall>(ids: &serde_json::Value) {
        let solc = ids[C::SIGNATURE]
            .as_str()
            .unwrap_or_else(|| panic!("{} is not in the compiled ABI", C::SIGNATURE));
        assert_eq!(solc, hex::encode(C::SELECTOR), "{}", C::SIGNATURE);
    }
    let reg = ids(KMS_REGISTRY_ARTIFACT);
    check::<IKmsRegistry::isAppAllowedCall>(&reg);
    check::<IKmsRegistry::isKmsAllowedCall>(&reg);
    check::<IKmsRegistry::gatewayAppIdCall>(&reg);
    check::<IKmsRegistry::setGatewayAppIdCall>(&reg);
    check::<IKmsRegistry::registerAppCall>(&reg);
    check::<IKmsRegistry::deregisterAppCall>(&reg);
    check::<IKmsRegistry::addOsImageHashCall>(&reg);
    check::<IKmsRegistry::removeOsImageHashCall>(&reg);
    check::<IKmsRegistry::addKmsAggregatedMrCall>(&reg);
    check::<IKmsRegistry::removeKmsAggregatedMrCall>(&reg);
    check::<IKmsRegistry::addKmsDeviceCall>(&reg);
    check::<IKmsRegistry::removeKmsDeviceCall>(&reg);
    let app = ids(APP_AUTH_ARTIFACT);
    check::<IKmsRegistry::isAppAllowedCall>(&app);
    check::<IAppAuthAdmin::addComposeHashCall>(&app);
    check::<IAppAuthAdmin::removeComposeHashCall>(&app);
    check::<IAppAuthAdmin::addDeviceCall>(&app);
    check::<IAppAuthAdmin::removeDeviceCall>(&app);
    check::<IAppAuthAdmin::setAllowAnyDeviceCall>(&app);
    check::<IAppAuthAdmin::setRequireTcbUpToDateCall>(&app);
    // dstack's documented ERC-165 id for IAppAuth is isAppAllowed's selector.
    assert_eq!(
        app["isAppAllowed((address,bytes32,address,bytes32,bytes32,bytes32,bytes32,string,string[]))"],
        "1e079198"
    );
}
