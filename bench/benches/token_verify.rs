//! Access-token validation: what every authenticated request pays before its Redis round
//! trip (signature, algorithm, kid and expiry checks, then building the denylist keys).

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use flashsale::config::Settings;
use flashsale::modules::auth::TokenKeys;
use flashsale::modules::users::Role;

fn token_verify(c: &mut Criterion) {
    let settings = Settings::load_for(Path::new("../config"), "test").expect("config loads");
    let keys = TokenKeys::new(&settings.auth).expect("keys");
    let token = keys
        .issue(uuid::Uuid::now_v7(), Role::Customer, uuid::Uuid::new_v4())
        .expect("token");

    c.bench_function("access_token_verify", |b| {
        b.iter(|| keys.verify(black_box(&token)).expect("valid"))
    });
    c.bench_function("access_token_verify_and_denylist_keys", |b| {
        b.iter(|| {
            let claims = keys.verify(black_box(&token)).expect("valid");
            let denied = format!("fs:denied-jti:{}", claims.jti.simple());
            let revoked = format!("fs:{{rt:{}}}:revoked", claims.sid.simple());
            black_box((denied, revoked))
        })
    });
}

criterion_group!(benches, token_verify);
criterion_main!(benches);
