/*
 * qemu_icount: a QEMU TCG plugin (plugin API version 1, QEMU 7.2) that counts executed guest
 * instructions per ELF function symbol, and per symbol the instructions of chosen encodings.
 *
 *   qemu-aarch64 -plugin icount.so,out=counts.tsv,class=sdot:4:0xbfe0fc00:0x0e809400 ./prog
 *
 * Arguments (QEMU passes each `key=value` of the -plugin option):
 *   out=PATH                    where the table is written when the guest exits (required)
 *   class=NAME:SIZE:MASK:VALUE  an instruction class: an instruction of SIZE (2 or 4) bytes
 *                               whose little-endian word w has (w & MASK) == VALUE; repeating
 *                               a NAME adds another pattern to that class (up to 16 classes,
 *                               64 patterns). For T32 the low half of w is the first halfword.
 *
 * Output: tab-separated, a header `symbol insns NAME...` and one row per symbol, where
 * `insns` is the number of executed instructions whose address lies in that symbol and each
 * NAME column the executed instructions of that class. Addresses outside every function
 * symbol QEMU knows (only the main ELF's symbols) are counted under `?`.
 *
 * Counting uses inline per-instruction additions, so it is exact and deterministic for a
 * single guest thread (several guest threads add without atomics).
 *
 * Debian ships no qemu-plugin.h, so the few API functions used are declared here; their
 * signatures are those of QEMU's plugin API version 1.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the QEMU plugin API v1, as far as used ---- */
#define EXPORT __attribute__((visibility("default")))
typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*udata_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb_t cb, void *userdata);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn, enum qemu_plugin_op op,
                                                void *ptr, uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
const char *qemu_plugin_insn_symbol(const struct qemu_plugin_insn *insn);

EXPORT int qemu_plugin_version = 1;

/* ---- instruction classes (columns) and per-symbol counters ---- */
#define MAX_CLASSES 16
#define MAX_PATTERNS 64
struct pattern { int cls; size_t size; uint32_t mask, value; };
static char class_names[MAX_CLASSES][32];
static int n_classes;
static struct pattern patterns[MAX_PATTERNS];
static int n_patterns;

struct entry {  /* counters of one symbol; never freed, inline ops point into it */
    const char *name;
    uint64_t insns;
    uint64_t cls[MAX_CLASSES];
    struct entry *next;
};
#define N_BUCKETS 4096
static struct entry *buckets[N_BUCKETS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char *out_path;

static struct entry *lookup(const char *name) {
    uint32_t h = 2166136261u;  /* FNV-1a */
    for (const char *p = name; *p; p++) h = (h ^ (uint8_t)*p) * 16777619u;
    struct entry **slot = &buckets[h % N_BUCKETS];
    for (struct entry *e = *slot; e; e = e->next)
        if (strcmp(e->name, name) == 0) return e;
    struct entry *e = calloc(1, sizeof *e);
    e->name = strdup(name);
    e->next = *slot;
    *slot = e;
    return e;
}

static uint32_t insn_word(const struct qemu_plugin_insn *insn, size_t size) {
    const uint8_t *b = qemu_plugin_insn_data(insn);
    uint32_t w = 0;
    for (size_t i = 0; i < size && i < 4; i++) w |= (uint32_t)b[i] << (8 * i);
    return w;
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        const char *sym = qemu_plugin_insn_symbol(insn);
        struct entry *e = lookup(sym && *sym ? sym : "?");
        qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &e->insns, 1);
        size_t size = qemu_plugin_insn_size(insn);
        uint32_t w = insn_word(insn, size);
        uint32_t hit = 0;  /* one count per class, even where several of its patterns match */
        for (int k = 0; k < n_patterns; k++)
            if (patterns[k].size == size && (w & patterns[k].mask) == patterns[k].value)
                hit |= 1u << patterns[k].cls;
        for (int c = 0; c < n_classes; c++)
            if (hit & (1u << c))
                qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64, &e->cls[c], 1);
    }
    pthread_mutex_unlock(&lock);
}

static void at_exit(qemu_plugin_id_t id, void *udata) {
    (void)id; (void)udata;
    FILE *f = fopen(out_path, "w");
    if (!f) {
        fprintf(stderr, "qemu_icount: cannot write %s\n", out_path);
        return;
    }
    fprintf(f, "symbol\tinsns");
    for (int k = 0; k < n_classes; k++) fprintf(f, "\t%s", class_names[k]);
    fprintf(f, "\n");
    for (int b = 0; b < N_BUCKETS; b++)
        for (struct entry *e = buckets[b]; e; e = e->next) {
            if (!e->insns) continue;  /* translated but never executed */
            fprintf(f, "%s\t%llu", e->name, (unsigned long long)e->insns);
            for (int k = 0; k < n_classes; k++) fprintf(f, "\t%llu", (unsigned long long)e->cls[k]);
            fprintf(f, "\n");
        }
    fclose(f);
}

/* NAME:SIZE:MASK:VALUE; a NAME seen before adds a pattern to that class */
static int parse_class(const char *spec) {
    char name[32];
    long size, mask, value;
    const char *colon = strchr(spec, ':');
    if (n_patterns == MAX_PATTERNS || !colon || colon == spec || (size_t)(colon - spec) >= sizeof name)
        return -1;
    memcpy(name, spec, colon - spec);
    name[colon - spec] = 0;
    if (sscanf(colon + 1, "%li:%li:%li", &size, &mask, &value) != 3 || (size != 2 && size != 4))
        return -1;
    int c = 0;
    while (c < n_classes && strcmp(class_names[c], name) != 0) c++;
    if (c == n_classes) {
        if (n_classes == MAX_CLASSES) return -1;
        strcpy(class_names[n_classes++], name);
    }
    patterns[n_patterns++] = (struct pattern){c, (size_t)size, (uint32_t)mask, (uint32_t)value};
    return 0;
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const void *info, int argc, char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out_path = strdup(argv[i] + 4);
        } else if (strncmp(argv[i], "class=", 6) == 0 && parse_class(argv[i] + 6) == 0) {
            continue;
        } else {
            fprintf(stderr, "qemu_icount: bad argument '%s' (expected out=PATH or "
                    "class=NAME:SIZE:MASK:VALUE, at most %d classes of %d patterns)\n", argv[i],
                    MAX_CLASSES, MAX_PATTERNS);
            return -1;
        }
    }
    if (!out_path) {
        fprintf(stderr, "qemu_icount: the out=PATH argument is required\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
