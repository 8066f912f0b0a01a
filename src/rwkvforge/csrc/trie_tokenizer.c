/* rwkvforge: the RWKV World tokenizer's greedy longest match in plain C.
 *
 * Built on first use by rwkvforge/native.py with the system C compiler (no Python
 * headers), loaded with ctypes by rwkvforge/tokenizer.py and used when that works;
 * pyrwkv-tokenizer and the rwkv package's pure-Python TRIE_TOKENIZER remain the fallbacks,
 * and the reference is the test oracle. Same rule as the reference: at each position take the longest vocabulary
 * entry that is a prefix of the remaining bytes. Ids are written straight into a uint16
 * buffer: no Python object per token.
 *
 * Layout: a byte trie with 12-byte nodes in depth-first order; each inner node owns a child
 * table over the range of bytes its children start with (1.2 MB for the whole World
 * vocabulary), so a step is two loads and a range check, with no search.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t token; /* token id ending here, or -1 */
    int32_t base;  /* its child table in dtab, or -1 for a leaf */
    uint8_t lo;    /* the table covers bytes lo .. lo + span */
    uint8_t span;
    uint16_t pad;
} rf_node;         /* 12 bytes: one load brings all a step needs */

typedef struct {
    int32_t n_nodes;
    rf_node *node;
    int32_t *dtab; /* child tables: child node or -1 */
} rf_trie;

static int64_t next_pow2(int64_t x) {
    int64_t p = 1;
    while (p < x) p <<= 1;
    return p;
}

void rf_free(rf_trie *t) {
    if (!t) return;
    free(t->node);
    free(t->dtab);
    free(t);
}

/* Build the trie of `n` tokens, inserted in the order `order` (lexicographic order of their
 * bytes gives depth-first node numbers: a token's path lies close together in memory):
 * token i is blob[offs[i] .. offs[i] + lens[i]). Empty tokens are skipped. Returns NULL when
 * out of memory or when two tokens have the same bytes. */
rf_trie *rf_build(const uint8_t *blob, const int64_t *offs, const int32_t *lens,
                  const int32_t *order, int32_t n) {
    int64_t total = 0;
    for (int32_t i = 0; i < n; i++) total += lens[i] > 0 ? lens[i] : 0;
    int64_t max_nodes = total + 1;
    /* construction: open-addressing map (parent << 8 | byte) -> child */
    int64_t cap = next_pow2(2 * max_nodes + 16);
    int64_t *hkey = malloc(cap * sizeof(int64_t));
    int32_t *hval = malloc(cap * sizeof(int32_t));
    uint8_t *lo = NULL, *hi = NULL;
    rf_trie *t = calloc(1, sizeof(rf_trie));
    if (!hkey || !hval || !t) goto fail;
    t->node = malloc(max_nodes * sizeof(rf_node));
    lo = malloc(max_nodes);
    hi = malloc(max_nodes);
    if (!t->node || !lo || !hi) goto fail;
    for (int64_t i = 0; i < cap; i++) hkey[i] = -1;
    for (int64_t i = 0; i < max_nodes; i++) {
        t->node[i].token = -1;
        lo[i] = 255;
        hi[i] = 0;
    }
    int32_t nodes = 1;
    for (int32_t k = 0; k < n; k++) {
        int32_t id = order[k];
        if (id < 0 || id >= n || lens[id] <= 0) continue;
        int32_t v = 0;
        const uint8_t *p = blob + offs[id];
        for (int32_t j = 0; j < lens[id]; j++) {
            int64_t key = ((int64_t)v << 8) | p[j];
            uint64_t h = ((uint64_t)key * 0x9E3779B97F4A7C15ull) & (uint64_t)(cap - 1);
            while (hkey[h] != -1 && hkey[h] != key) h = (h + 1) & (uint64_t)(cap - 1);
            if (hkey[h] == -1) {
                hkey[h] = key;
                hval[h] = nodes++;
                if (p[j] < lo[v]) lo[v] = p[j];
                if (p[j] > hi[v]) hi[v] = p[j];
            }
            v = hval[h];
        }
        if (t->node[v].token != -1) goto fail; /* same bytes twice: ambiguous */
        t->node[v].token = id;
    }
    t->n_nodes = nodes;
    /* each inner node's children as a table over its byte range lo..hi */
    int64_t size = 0;
    for (int32_t v = 0; v < nodes; v++) {
        if (lo[v] > hi[v]) {
            t->node[v].base = -1;
            continue;
        }
        t->node[v].base = (int32_t)size;
        t->node[v].lo = lo[v];
        t->node[v].span = (uint8_t)(hi[v] - lo[v]);
        size += hi[v] - lo[v] + 1;
    }
    t->dtab = malloc((size_t)(size + 1) * sizeof(int32_t));
    if (!t->dtab) goto fail;
    for (int64_t i = 0; i < size; i++) t->dtab[i] = -1;
    for (int64_t h = 0; h < cap; h++) {
        if (hkey[h] == -1) continue;
        const rf_node *parent = &t->node[hkey[h] >> 8];
        t->dtab[parent->base + (int32_t)(hkey[h] & 255) - parent->lo] = hval[h];
    }
    free(hkey); free(hval); free(lo); free(hi);
    return t;
fail:
    free(hkey); free(hval); free(lo); free(hi);
    rf_free(t);
    return NULL;
}

/* Tokenize s[0..n) into out (room for n ids). Returns the number of ids, or -(i + 1) when
 * no token starts with the byte at position i (impossible with a vocabulary that holds all
 * 256 single bytes, as the World vocabulary does). */
int64_t rf_encode(const rf_trie *t, const uint8_t *s, int64_t n, uint16_t *out) {
    const rf_node *nodes = t->node;
    const int32_t *dtab = t->dtab;
    int64_t i = 0, k = 0;
    while (i < n) {
        const rf_node *v = nodes;
        int32_t best = -1;
        int64_t j = i, end = i;
        while (j < n && v->base >= 0) {
            uint32_t d = (uint32_t)s[j] - v->lo;
            if (d > v->span) break;
            int32_t next = dtab[v->base + d];
            if (next < 0) break;
            v = nodes + next;
            j++;
            if (v->token >= 0) {
                best = v->token;
                end = j;
            }
        }
        if (best < 0) return -(i + 1);
        out[k++] = (uint16_t)best;
        i = end;
    }
    return k;
}

/* 1 when the bytes of ids[0..n) (token i = blob[offs[i] .. offs[i] + lens[i])), back to
 * back, are exactly s[0..n_s), else 0; *empty gets how many ids have no bytes. Independent
 * of the trie: it checks rf_encode's output against the vocabulary table itself. */
int32_t rf_check(const uint16_t *ids, int64_t n, const uint8_t *blob, const int64_t *offs,
                 const int32_t *lens, const uint8_t *s, int64_t n_s, int64_t *empty) {
    int64_t pos = 0, n_empty = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t len = lens[ids[i]];
        if (len == 0) {
            n_empty++;
            continue;
        }
        if (len > n_s - pos || memcmp(blob + offs[ids[i]], s + pos, (size_t)len) != 0) {
            *empty = n_empty;
            return 0;
        }
        pos += len;
    }
    *empty = n_empty;
    return pos == n_s;
}
