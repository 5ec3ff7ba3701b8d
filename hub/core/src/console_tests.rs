use std::time::{Duration, Instant};

use tianwang_proto::ErrorCode;
use tianwang_proto::v1::session_event::Kind as Event;
use tianwang_proto::v1::session_request::Kind as Request;
use tianwang_proto::v1::tile_state::State;
use tianwang_proto::v1::{AddTile, Auth, Ping, RemoveTile, SessionDescription, SessionRequest};

use super::*;

fn req(kind: Request) -> SessionRequest {
    SessionRequest { kind: Some(kind) }
}

fn drain(s: &mut ConsoleSession) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

fn errors(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(SessionEvent {
                kind: Some(Event::Error(e)),
            }) => Some(e.message.clone()),
            _ => None,
        })
        .collect()
}

fn tile_states(actions: &[Action]) -> Vec<(String, State)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(SessionEvent {
                kind: Some(Event::Tile(t)),
            }) => Some((t.tile_id.clone(), t.state())),
            _ => None,
        })
        .collect()
}

fn add(tile: &str, unit: &str) -> SessionRequest {
    req(Request::AddTile(AddTile {
        tile_id: tile.into(),
        unit_id: unit.into(),
    }))
}

fn answer(revision: u64) -> SessionRequest {
    req(Request::Answer(SessionDescription {
        r#type: "answer".into(),
        sdp: "v=0".into(),
        revision,
        send_mids: Vec::new(),
    }))
}

/// A session past authentication.
fn signed_in(t0: Instant) -> ConsoleSession {
    let mut s = ConsoleSession::new(t0, ConsoleConfig::default());
    s.handle_request(t0, req(Request::Auth(Auth { token: "t".into() })));
    assert_eq!(
        drain(&mut s),
        vec![Action::Authenticate {
            token: Sensitive::new("t".into())
        }]
    );
    let p = Principal {
        user: "duty".into(),
        role: "commander".into(),
    };
    let ready = ConsoleSession::ready("1", &p, "hub", vec![]);
    s.authenticated(t0, p, ready);
    drain(&mut s);
    s
}

#[test]
fn nothing_but_auth_and_ping_before_authentication() {
    let t0 = Instant::now();
    let mut s = ConsoleSession::new(t0, ConsoleConfig::default());
    s.handle_request(t0, add("a", "bwc-1"));
    s.handle_request(t0, req(Request::Ping(Ping { nonce: 7 })));
    let out = drain(&mut s);
    assert_eq!(errors(&out), vec!["authenticate first"]);
    assert!(out.iter().any(
        |a| matches!(a, Action::Send(SessionEvent { kind: Some(Event::Pong(p)) }) if p.nonce == 7)
    ));
    assert!(!out.iter().any(|a| matches!(a, Action::AttachTile { .. })));
    assert!(!s.is_closed());
}

#[test]
fn a_console_that_never_authenticates_is_closed() {
    let t0 = Instant::now();
    let mut s = ConsoleSession::new(t0, ConsoleConfig::default());
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    s.handle_timeout(t0 + Duration::from_secs(9));
    assert!(!s.is_closed());
    s.handle_timeout(t0 + Duration::from_secs(10));
    assert!(s.is_closed());
    assert!(drain(&mut s).iter().any(|a| matches!(
        a,
        Action::Close {
            code: ErrorCode::Unauthorized,
            ..
        }
    )));
}

#[test]
fn a_rejected_token_closes_the_session() {
    let t0 = Instant::now();
    let mut s = ConsoleSession::new(t0, ConsoleConfig::default());
    s.handle_request(
        t0,
        req(Request::Auth(Auth {
            token: "bad".into(),
        })),
    );
    drain(&mut s);
    s.auth_failed("token rejected: expired");
    let out = drain(&mut s);
    assert_eq!(errors(&out), vec!["token rejected: expired"]);
    assert!(s.is_closed());
}

#[test]
fn a_tile_goes_live_once_its_offer_is_answered() {
    let t0 = Instant::now();
    let mut s = signed_in(t0);
    s.handle_request(t0, add("a", "bwc-1"));
    assert_eq!(
        drain(&mut s),
        vec![Action::AttachTile {
            tile_id: "a".into(),
            unit_id: "bwc-1".into()
        }]
    );
    s.tile_attached("a", "0", "1");
    let out = drain(&mut s);
    assert_eq!(tile_states(&out), vec![("a".into(), State::Pending)]);
    assert!(out.contains(&Action::CreateOffer { revision: 1 }));
    s.offer_created(t0, 1, "offer sdp".into(), Vec::new());
    assert!(
        matches!(drain(&mut s)[..], [Action::Send(SessionEvent { kind: Some(Event::Offer(ref o)) })] if o.revision == 1)
    );
    s.handle_request(t0, answer(1));
    assert_eq!(
        drain(&mut s),
        vec![Action::ApplyAnswer {
            revision: 1,
            sdp: "v=0".into()
        }]
    );
    s.answer_applied(1, Ok(()));
    assert_eq!(tile_states(&drain(&mut s)), vec![("a".into(), State::Live)]);
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn changes_during_an_offer_wait_for_its_answer_then_go_in_one_more_offer() {
    let t0 = Instant::now();
    let mut s = signed_in(t0);
    s.handle_request(t0, add("a", "bwc-1"));
    s.tile_attached("a", "0", "1");
    s.offer_created(t0, 1, "o1".into(), Vec::new());
    drain(&mut s);
    s.handle_request(t0, add("b", "bwc-2"));
    s.tile_attached("b", "2", "3");
    s.handle_request(t0, add("c", "bwc-3"));
    s.tile_attached("c", "4", "5");
    let out = drain(&mut s);
    assert!(
        !out.iter().any(|a| matches!(a, Action::CreateOffer { .. })),
        "one offer at a time: {out:?}"
    );
    s.handle_request(t0, answer(1));
    drain(&mut s);
    s.answer_applied(1, Ok(()));
    let out = drain(&mut s);
    assert_eq!(tile_states(&out), vec![("a".into(), State::Live)]);
    assert!(out.contains(&Action::CreateOffer { revision: 2 }));
    s.offer_created(t0, 2, "o2".into(), Vec::new());
    s.handle_request(t0, answer(2));
    s.answer_applied(2, Ok(()));
    let states = tile_states(&drain(&mut s));
    assert_eq!(
        states,
        vec![("b".into(), State::Live), ("c".into(), State::Live)]
    );
}

#[test]
fn a_stale_or_unasked_answer_is_an_error_and_a_missing_one_closes_the_session() {
    let t0 = Instant::now();
    let mut s = signed_in(t0);
    s.handle_request(t0, answer(1));
    assert_eq!(errors(&drain(&mut s)), vec!["no offer is outstanding"]);
    s.handle_request(t0, add("a", "bwc-1"));
    s.tile_attached("a", "0", "1");
    s.offer_created(t0, 1, "o1".into(), Vec::new());
    drain(&mut s);
    s.handle_request(t0, answer(7));
    assert_eq!(
        errors(&drain(&mut s)),
        vec!["answer for offer 7, but the offer outstanding is 1"]
    );
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(15)));
    s.handle_timeout(t0 + Duration::from_secs(15));
    assert!(s.is_closed());
    assert_eq!(errors(&drain(&mut s)), vec!["no answer to offer 1 in time"]);
}

#[test]
fn removing_a_tile_detaches_it_and_renegotiates() {
    let t0 = Instant::now();
    let mut s = signed_in(t0);
    s.handle_request(t0, add("a", "bwc-1"));
    s.tile_attached("a", "0", "1");
    s.offer_created(t0, 1, "o1".into(), Vec::new());
    s.handle_request(t0, answer(1));
    s.answer_applied(1, Ok(()));
    drain(&mut s);
    s.handle_request(
        t0,
        req(Request::RemoveTile(RemoveTile {
            tile_id: "a".into(),
        })),
    );
    let out = drain(&mut s);
    assert!(out.contains(&Action::DetachTile {
        tile_id: "a".into()
    }));
    assert_eq!(tile_states(&out), vec![("a".into(), State::Removed)]);
    assert!(out.contains(&Action::CreateOffer { revision: 2 }));
    assert_eq!(s.tile_count(), 0);
    s.handle_request(
        t0,
        req(Request::RemoveTile(RemoveTile {
            tile_id: "a".into(),
        })),
    );
    assert_eq!(errors(&drain(&mut s)), vec!["no such tile"]);
}

#[test]
fn tile_ids_are_checked_and_counted() {
    let t0 = Instant::now();
    let mut s = ConsoleSession::new(
        t0,
        ConsoleConfig {
            max_tiles: 2,
            ..ConsoleConfig::default()
        },
    );
    s.handle_request(t0, req(Request::Auth(Auth { token: "t".into() })));
    let p = Principal {
        user: "u".into(),
        role: "viewer".into(),
    };
    s.authenticated(t0, p.clone(), ConsoleSession::ready("1", &p, "hub", vec![]));
    drain(&mut s);
    s.handle_request(t0, add("", "u"));
    s.handle_request(t0, add("a b", "u"));
    s.handle_request(t0, add("a", "u"));
    s.handle_request(t0, add("a", "u"));
    s.handle_request(t0, add("b", "u"));
    s.handle_request(t0, add("c", "u"));
    let e = errors(&drain(&mut s));
    assert_eq!(
        e,
        vec![
            "tile ids are 1 to 64 letters, digits, - or _",
            "tile ids are 1 to 64 letters, digits, - or _",
            "tile id already in use",
            "at most 2 tiles per console"
        ]
    );
}

#[test]
fn a_tile_that_cannot_attach_is_reported_and_forgotten() {
    let t0 = Instant::now();
    let mut s = signed_in(t0);
    s.handle_request(t0, add("a", "bwc-404"));
    drain(&mut s);
    s.tile_failed(
        "a",
        ErrorCode::UnknownUnit,
        "unit \"bwc-404\" is not online",
    );
    let out = drain(&mut s);
    assert_eq!(errors(&out), vec!["unit \"bwc-404\" is not online"]);
    assert_eq!(tile_states(&out), vec![("a".into(), State::Removed)]);
    assert_eq!(s.tile_count(), 0);
    assert!(!s.is_closed());
}

#[test]
fn undecodable_messages_are_answered_not_fatal() {
    let t0 = Instant::now();
    let mut s = signed_in(t0);
    s.handle_undecodable("expected value at line 1 column 1");
    assert_eq!(
        errors(&drain(&mut s)),
        vec!["message not understood: expected value at line 1 column 1"]
    );
    assert!(!s.is_closed());
}

#[test]
fn an_authenticate_action_does_not_print_its_token() {
    let action = Action::Authenticate {
        token: Sensitive::new("eyJhbGciOiJFZERTQSJ9.e30.c2VjcmV0".into()),
    };
    let printed = format!("{action:?} {action:#?}");
    assert!(
        !printed.contains("eyJ") && !printed.contains("c2VjcmV0"),
        "{printed}"
    );
    assert!(printed.contains("<redacted>"), "{printed}");
}
