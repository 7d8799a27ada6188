/* weights.c: the current weights for replies, and the same-host shared-memory slots they also go
 * through. */
#include "coord.h"

static void free_snapshot(void *data, void *hint) {
    (void)hint;
    free(data);
}

/* One snapshot of the current version in the wire's dtype, shared by every TCP reply. */
static void refresh_weights(coord_t *c) {
    if (c->weights_valid) return;
    const kd_dtype_t dtype = kd_wire_format_dtype(c->r.cluster.wire);
    size_t bytes = c->model->n_params * kd_dtype_size(dtype);
    void *snapshot = kd_xmalloc(bytes);
    coord_pack_current_weights(c, dtype, snapshot);
    zmq_msg_init_data(&c->weights_msg, snapshot, bytes, free_snapshot, NULL);
    c->weights_valid = true;
}

void coord_invalidate_weights(coord_t *c) {
    if (c->weights_valid) zmq_msg_close(&c->weights_msg);
    c->weights_valid = false;
}

kd_wire_tensor_t coord_weights_tensor(coord_t *c) {
    refresh_weights(c);
    const kd_layout_t layout =
        kd_layout_as(&KD_LAYOUT_WEIGHTS, kd_wire_format_dtype(c->r.cluster.wire));
    kd_wire_tensor_t t = kd_layout_tensor(&layout, (int64_t[]){(int64_t)c->model->n_params});
    t.share = &c->weights_msg;
    return t;
}

void coord_setup_shared_memory(coord_t *c) {
    if (!c->r.cluster.shared_memory) return;
    kd_node_hostname(c->hostname, sizeof c->hostname);
    if (getrandom(&c->shm_token, sizeof c->shm_token, 0) != sizeof c->shm_token)
        c->shm_token = (uint64_t)getpid() << 32 ^ (uint64_t)(kd_now() * 1e6);
    long slots = c->r.cluster.workers + 1; /* one per worker holding a version, one to write */
    if (slots > MAX_SHM_SLOTS) slots = MAX_SHM_SLOTS;
    char err[KD_ERR_LEN];
    if (kd_shm_create(&c->weights_shm, "kdist-weights", (uint32_t)slots, c->model->n_params,
                      c->shm_token, err, sizeof err) != 0) {
        kd_log(KD_LOG_WARN, "COORD-SHM", "%s: workers on this machine will use TCP", err);
        return;
    }
    for (long i = 0; i < slots; i++) c->slot_version[i] = UINT64_MAX;
}

/* A gradient segment for a worker on this machine, described in *offer; false to use TCP. */
bool coord_offer_shared_memory(coord_t *c, member_t *m, Kdist__SharedMemory *offer) {
    if (!c->weights_shm.base || m->role != KDIST__ROLE__WORKER || strcmp(m->host, c->hostname) != 0)
        return false;
    char name[96], err[KD_ERR_LEN];
    snprintf(name, sizeof name, "kdist-gradient-%s", m->node_id);
    if (kd_shm_create(&m->grad_shm, name, 1, c->model->n_params, c->shm_token, err, sizeof err) !=
        0) {
        kd_log(KD_LOG_WARN, "COORD-SHM", "%s: worker %s will use TCP", err, m->node_id);
        return false;
    }
    offer->pid = (uint32_t)getpid();
    offer->weights_fd = c->weights_shm.fd;
    offer->weight_slots = c->weights_shm.n_slots;
    offer->gradient_fd = m->grad_shm.fd;
    offer->token = c->shm_token;
    return true;
}

/* The slot holding the current version, written now if none does; -1 when every slot is still
 * being read by some worker (the answer then goes over TCP). */
static int current_slot(coord_t *c) {
    int free_slot = -1;
    for (uint32_t s = 0; s < c->weights_shm.n_slots; s++) {
        if (c->slot_version[s] == c->s.version) return (int)s;
        if (c->slot_readers[s] == 0 && free_slot < 0) free_slot = (int)s;
    }
    if (free_slot < 0) return -1;
    coord_settle_weights(c);
    kd_shm_write(&c->weights_shm, (uint32_t)free_slot, c->s.version, c->model->params);
    c->slot_version[free_slot] = c->s.version;
    return free_slot;
}

void coord_release_slot(coord_t *c, member_t *m) {
    if (m->held_slot) c->slot_readers[m->held_slot - 1]--;
    m->held_slot = 0;
}

/* The worker pushed a gradient computed on `version`: it is done with any slot it was pointed to
 * up to then (it computes on its slot in place, so an idle worker keeps its slot). */
void coord_note_weights_held(coord_t *c, member_t *m, uint64_t version) {
    if (m->held_slot && version >= c->slot_version[m->held_slot - 1]) coord_release_slot(c, m);
}

/* The reply that lets a worker go on: the weights, or stop once the run is finishing. */
reply_t coord_go_on(coord_t *c) {
    return c->phase == RUN_FINISHING ? REPLY_STOP : REPLY_WEIGHTS;
}

/* Weights to a worker, with the current weights unless it waits or stops. */
void coord_send_weights(coord_t *c, member_t *m, reply_t reply) {
    Kdist__Weights w = KDIST__WEIGHTS__INIT;
    w.version = c->s.version;
    w.wait = reply == REPLY_WAIT;
    w.stop = reply == REPLY_STOP || m->drain;
    w.redo = reply == REPLY_REDO;
    w.duplicate = reply == REPLY_DROPPED;
    w.batches_left = coord_batches_left(c);
    w.streamed = reply == REPLY_STREAMED;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_WEIGHTS;
    env.weights = &w;
    kd_wire_tensor_t t;
    int n_tensors = 0;
    if (!w.wait && !w.stop && !w.streamed) {
        coord_release_slot(c, m);
        int slot = m->shm_active ? current_slot(c) : -1;
        if (slot >= 0) {
            c->slot_readers[slot]++;
            m->held_slot = w.shared_slot = (uint32_t)slot + 1;
        } else {
            t = coord_weights_tensor(c);
            n_tensors = 1;
        }
    }
    coord_send_to(c, m, &env, &t, n_tensors);
    m->state = w.wait ? WORKER_HELD : WORKER_COMPUTING;
}
